"""Several SAEs scored by one downstream call (``Downstream.run_many``) share the clean
forward pass per batch, and each gets exactly, bit for bit, what it gets alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dictbench.group_scoring import chunks
from dictbench.tasks import downstream
from dictbench.tasks.downstream import Downstream
from tests.test_downstream import N_SEQ, PERTURBATIONS, FnSAE, make_env

_FNS = [
    PERTURBATIONS["half_plus_offset"],
    PERTURBATIONS["flip_dims"],
    lambda f: 0.7 * f,
    lambda f: f,  # identity
]


@pytest.fixture(scope="module")
def ds_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    body = torch.randint(0, 256, (N_SEQ, 9), generator=g)
    return torch.cat([torch.full((N_SEQ, 1), 256), body], dim=1)


@pytest.fixture(scope="module")
def ds_train_mean(tiny_llama) -> np.ndarray:
    g = torch.Generator().manual_seed(5)
    return (torch.randn(tiny_llama.d_model, generator=g) * 2.0).numpy().astype(np.float32)


@pytest.mark.parametrize("seqs_per_batch", [4, 2, 1])
def test_a_group_scores_exactly_as_each_alone(tiny_llama, ds_ids, ds_train_mean, seqs_per_batch):
    env = make_env(tiny_llama, ds_ids, ds_train_mean, seqs_per_batch=seqs_per_batch)
    group = Downstream().run_many([FnSAE(fn) for fn in _FNS], env)
    for fn, res in zip(_FNS, group, strict=True):
        own_env = make_env(tiny_llama, ds_ids, ds_train_mean, seqs_per_batch=seqs_per_batch)
        alone = Downstream().run(FnSAE(fn), own_env)
        assert res.metrics == alone.metrics  # identical, not merely close
        assert res.details == alone.details and res.eval_tokens == alone.eval_tokens
    # The SAEs really differ, so equality above is not one result copied four times.
    assert len({r.metrics["ce_sae"] for r in group}) == len(_FNS)


def test_the_clean_pass_runs_once_per_batch_for_the_group(
    tiny_llama, ds_ids, ds_train_mean, monkeypatch
):
    """3 SAEs, 5 sequences in batches of 4 and 1: 2 clean passes (not 6), 6 spliced
    passes, and 2 for the zero/mean ablation; the clean ones see the cached activations."""
    env = make_env(tiny_llama, ds_ids, ds_train_mean)
    clean_inputs: list[torch.Tensor] = []
    real_clean = downstream.clean_pass

    def counting_clean(env_, x, ids):
        clean_inputs.append(x.clone())
        return real_clean(env_, x, ids)

    rows: list[int] = []
    real_run_from = tiny_llama.run_from

    def counting_run_from(hook, acts, ids):
        rows.append(acts.shape[0])
        return real_run_from(hook, acts, ids)

    monkeypatch.setattr(downstream, "clean_pass", counting_clean)
    monkeypatch.setattr(tiny_llama, "run_from", counting_run_from)
    Downstream().run_many([FnSAE(fn) for fn in _FNS[:3]], env)
    assert [x.shape[0] for x in clean_inputs] == [4, 1]
    for x, seqs in zip(clean_inputs, [slice(0, 4), slice(4, 5)], strict=True):
        assert torch.equal(x, torch.from_numpy(env.eval_acts[seqs]))
    # per batch: clean once, then each SAE's splice; then zero + mean of one window (all
    # windows start with BOS, so they share one ablated pass)
    assert rows == [4, 4, 4, 4, 1, 1, 1, 1, 2]


def test_an_identity_sae_in_a_group_changes_nothing_exactly(tiny_llama, ds_ids, ds_train_mean):
    """Its spliced batch is the clean batch with the same shape, so its logits are the clean
    ones bit for bit: KL exactly 0 and ce_sae exactly ce_clean, whatever its neighbours."""
    env = make_env(tiny_llama, ds_ids, ds_train_mean)
    res = Downstream().run_many([FnSAE(_FNS[0]), FnSAE(lambda f: f)], env)
    m = res[1].metrics
    assert m["kl"] == 0.0 and m["ce_sae"] == m["ce_clean"] and m["delta_ce"] == 0.0
    assert res[0].metrics["kl"] > 1e-4


@pytest.mark.parametrize(
    ("sizes", "budget", "want"),
    [
        ([3, 3, 3], 6, [[0, 1], [2]]),
        ([3, 3, 3], 9, [[0, 1, 2]]),
        ([3, 3, 3], 0, [[0], [1], [2]]),
        ([10, 1, 1], 5, [[0], [1, 2]]),  # one too big for the budget is scored on its own
        ([1, 10, 1], 5, [[0], [1], [2]]),
        ([], 5, []),
    ],
)
def test_chunks_hold_what_fits_the_budget(sizes, budget, want):
    assert chunks(sizes, budget) == want
