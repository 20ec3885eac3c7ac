"""Downstream fidelity (tasks/downstream.py) against independent computations.

The reference values come from the unmodified Hugging Face forward
(``subject.logits``) and from a plain forward hook that overwrites the residual
stream, never from dictbench's own splicing, so a wrong prediction offset, a
spliced special position or a wrong KL direction all show up.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dictbench.data.corpus import keep_positions
from dictbench.tasks import downstream
from dictbench.tasks.base import TaskEnv
from dictbench.tasks.downstream import Downstream

HOOK = "resid_post.1"
N_SEQ, CTX = 5, 10  # 5 sequences: batches of 4 and 1 with the default seqs_per_batch

_OFFSET = torch.randn(32, generator=torch.Generator().manual_seed(11))
PERTURBATIONS = {
    # RMSNorm makes a pure rescaling nearly invisible to a random tiny llama, so each
    # perturbation also changes the direction of the activation.
    "half_plus_offset": lambda f: 0.5 * f + _OFFSET,
    "flip_dims": lambda f: f.flip(-1),
}


class FnSAE(torch.nn.Module):
    """encode = identity, decode = fn(f); forward = decode(encode(x))."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.seen: list[torch.Tensor] = []

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return x

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.fn(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


@pytest.fixture(scope="module")
def ds_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(99)
    body = torch.randint(0, 256, (N_SEQ, CTX - 1), generator=g)
    return torch.cat([torch.full((N_SEQ, 1), 256), body], dim=1)


@pytest.fixture(scope="module")
def ds_train_mean(tiny_llama) -> np.ndarray:
    g = torch.Generator().manual_seed(5)
    return (torch.randn(tiny_llama.d_model, generator=g) * 2.0).numpy().astype(np.float32)


def make_env(subject, ids: torch.Tensor, train_mean: np.ndarray, **ds_opts) -> TaskEnv:
    with torch.no_grad():
        acts = subject.run_to(HOOK, ids).float().numpy()
    return TaskEnv(
        eval_acts=np.ascontiguousarray(acts, dtype=np.float32),
        eval_token_ids=ids.numpy().astype(np.int32),
        keep_positions=keep_positions(ids.shape[1]),
        train_mean=train_mean,
        hook=HOOK,
        subject=subject,
        options={"downstream": {"max_tokens": 10**9, **ds_opts}},
    )


def spliced_logits(subject, ids: torch.Tensor, fn) -> torch.Tensor:
    """Full HF forward with layer 1's output replaced by fn(x) at positions 1.. only."""

    def post(_m, _i, out):
        x = out[0] if isinstance(out, tuple) else out
        y = x.clone()
        y[:, 1:] = fn(x[:, 1:])
        return (y, *out[1:]) if isinstance(out, tuple) else y

    handle = subject.layers[1].register_forward_hook(post)
    try:
        with torch.no_grad():
            return subject.logits(ids)
    finally:
        handle.remove()


def ce_over_predictions(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean CE of predictions made at positions 1..T-2 for targets 2..T-1."""
    v = logits.shape[-1]
    return float(
        F.cross_entropy(logits[:, 1:-1].double().reshape(-1, v), ids[:, 2:].reshape(-1).long())
    )


def test_identity_sae_changes_nothing(tiny_llama, ds_ids, ds_train_mean):
    env = make_env(tiny_llama, ds_ids, ds_train_mean)
    m = Downstream().run(FnSAE(lambda f: f), env).metrics
    assert abs(m["ce_sae"] - m["ce_clean"]) < 1e-5
    assert abs(m["kl"]) < 1e-6
    assert abs(m["delta_ce"]) < 1e-5
    assert m["ce_zero"] - m["ce_clean"] > 0.01  # the ratio below is well defined
    assert abs(m["ce_loss_recovered"] - 1.0) < 1e-5
    assert abs(m["ce_loss_recovered_mean_ablation"] - 1.0) < 1e-4


def test_a_bfloat16_model_gets_its_float32_cached_activations_back_in_bfloat16(
    tiny_llama_bf16, ds_ids, ds_train_mean
):
    """The cache stores float32; the layers after the hook run in the model's dtype. The
    bf16 -> float32 -> bf16 round trip is exact, so an identity SAE changes nothing."""
    env = make_env(tiny_llama_bf16, ds_ids, ds_train_mean)
    m = Downstream().run(FnSAE(lambda f: f), env).metrics
    with torch.no_grad():
        want = ce_over_predictions(tiny_llama_bf16.logits(ds_ids).float(), ds_ids)
    assert abs(m["ce_clean"] - want) < 1e-5
    assert abs(m["ce_sae"] - m["ce_clean"]) < 1e-6
    assert abs(m["kl"]) < 1e-6
    assert m["ce_zero"] - m["ce_clean"] > 0.01


@pytest.mark.parametrize("arch", ["tiny:llama", "tiny:gpt2", "tiny:gpt_neox"])
def test_ce_clean_matches_full_model_cross_entropy(tiny_subjects, ds_ids, arch):
    subject = tiny_subjects[arch]
    env = make_env(subject, ds_ids, np.zeros(subject.d_model, dtype=np.float32))
    res = Downstream().run(FnSAE(lambda f: f), env)
    with torch.no_grad():
        want = ce_over_predictions(subject.logits(ds_ids), ds_ids)
    assert abs(res.metrics["ce_clean"] - want) < 1e-5
    assert res.details["predicted_tokens"] == N_SEQ * (CTX - 2)
    assert res.eval_tokens == N_SEQ * (CTX - 2)


def test_ce_sae_matches_an_independent_splice(tiny_llama, ds_ids, ds_train_mean):
    env = make_env(tiny_llama, ds_ids, ds_train_mean)
    fn = PERTURBATIONS["half_plus_offset"]
    m = Downstream().run(FnSAE(fn), env).metrics
    want = ce_over_predictions(spliced_logits(tiny_llama, ds_ids, fn), ds_ids)
    assert abs(m["ce_sae"] - want) < 1e-5
    assert abs(m["ce_sae"] - m["ce_clean"]) > 1e-3
    zero = ce_over_predictions(spliced_logits(tiny_llama, ds_ids, torch.zeros_like), ds_ids)
    assert abs(m["ce_zero"] - zero) < 1e-5
    mu = torch.from_numpy(ds_train_mean)
    mean = ce_over_predictions(
        spliced_logits(tiny_llama, ds_ids, lambda x: mu.expand_as(x).clone()), ds_ids
    )
    assert abs(m["ce_mean"] - mean) < 1e-5


@pytest.mark.parametrize("first_tokens", [[256, 256, 7, 7, 3], [1, 2, 3, 4, 5]])
def test_ablated_losses_match_full_passes_when_windows_start_differently(
    tiny_llama, ds_ids, ds_train_mean, first_tokens
):
    """Windows share an ablated pass only when their position-0 activations agree: with
    two groups, or one window per group, the losses still equal a full ablated pass of
    every window (computed independently, by hooking the whole model)."""
    ids = ds_ids.clone()
    ids[:, 0] = torch.tensor(first_tokens)
    env = make_env(tiny_llama, ids, ds_train_mean)
    m = Downstream().run(FnSAE(lambda f: f), env).metrics
    zero = ce_over_predictions(spliced_logits(tiny_llama, ids, torch.zeros_like), ids)
    mu = torch.from_numpy(ds_train_mean)
    mean = ce_over_predictions(
        spliced_logits(tiny_llama, ids, lambda x: mu.expand_as(x).clone()), ids
    )
    assert abs(m["ce_zero"] - zero) < 1e-5
    assert abs(m["ce_mean"] - mean) < 1e-5
    assert len(downstream._ablation_groups(env, N_SEQ)) == len(set(first_tokens))


def test_zero_sae_equals_zero_ablation(tiny_llama, ds_ids, ds_train_mean):
    env = make_env(tiny_llama, ds_ids, ds_train_mean)
    m = Downstream().run(FnSAE(torch.zeros_like), env).metrics
    assert abs(m["ce_sae"] - m["ce_zero"]) < 1e-5
    assert abs(m["ce_loss_recovered"]) < 1e-5
    assert abs(m["delta_ce"] - (m["ce_zero"] - m["ce_clean"])) < 1e-9


def test_mean_sae_equals_mean_ablation(tiny_llama, ds_ids, ds_train_mean):
    env = make_env(tiny_llama, ds_ids, ds_train_mean)
    mu = torch.from_numpy(ds_train_mean)
    m = Downstream().run(FnSAE(lambda f: mu.expand_as(f).clone()), env).metrics
    assert abs(m["ce_sae"] - m["ce_mean"]) < 1e-5
    assert abs(m["ce_mean"] - m["ce_clean"]) > 1e-3
    assert abs(m["ce_loss_recovered_mean_ablation"]) < 1e-5


@pytest.mark.parametrize("which", sorted(PERTURBATIONS))
def test_kl_matches_torch_kl_div(tiny_llama, ds_ids, ds_train_mean, which):
    env = make_env(tiny_llama, ds_ids, ds_train_mean)
    fn = PERTURBATIONS[which]
    m = Downstream().run(FnSAE(fn), env).metrics
    with torch.no_grad():
        lp_clean = torch.log_softmax(tiny_llama.logits(ds_ids)[:, 1:-1].double(), -1)
    lp_sae = torch.log_softmax(spliced_logits(tiny_llama, ds_ids, fn)[:, 1:-1].double(), -1)
    # KL(p_clean || p_sae): kl_div(input=log q, target=log p) = sum p (log p - log q).
    kl_sum = F.kl_div(lp_sae, lp_clean, log_target=True, reduction="sum")
    want = float(kl_sum) / (N_SEQ * (CTX - 2))
    assert m["kl"] >= 0.0
    assert want > 1e-4  # the perturbation really moves the distribution
    assert abs(m["kl"] - want) < 1e-5 * max(1.0, want)
    # The reversed direction is a different number, so the check above pins the direction.
    rev = float(F.kl_div(lp_clean, lp_sae, log_target=True, reduction="sum")) / (N_SEQ * (CTX - 2))
    assert abs(rev - want) > 1e-6


def test_special_position_keeps_its_activation(tiny_llama, ds_ids, ds_train_mean, monkeypatch):
    env = make_env(tiny_llama, ds_ids, ds_train_mean)
    g = torch.Generator().manual_seed(3)
    sae = FnSAE(lambda f: 100.0 * torch.randn(f.shape, generator=g))
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_run_from = tiny_llama.run_from

    def spy_run_from(hook, acts, ids):
        logits = real_run_from(hook, acts, ids)
        calls.append((acts.detach().clone(), logits.detach().clone()))
        return logits

    monkeypatch.setattr(tiny_llama, "run_from", spy_run_from)
    m = Downstream().run(sae, env).metrics
    assert np.isfinite(m["ce_sae"])

    # The SAE only ever sees the non-special positions, in sequence order.
    d = tiny_llama.d_model
    seen = torch.cat(sae.seen)
    assert seen.shape == (N_SEQ * (CTX - 1), d)
    assert torch.equal(seen, torch.from_numpy(env.eval_acts[:, 1:].reshape(-1, d)))

    # Every variant keeps the original activation at position 0, so the logits there match
    # the clean model's in every variant. Per batch of sequences (4, then 1): the clean
    # pass, then the SAE's; then the zero and mean variants of one window, once per run
    # (every window starts with BOS, so all share one ablated pass).
    with torch.no_grad():
        clean_logits = tiny_llama.logits(ds_ids)
    rows = [[0, 1, 2, 3], [0, 1, 2, 3], [4], [4], [0, 0]]
    assert [a.shape[0] for a, _ in calls] == [len(r) for r in rows]
    for (acts, logits), seqs in zip(calls, rows, strict=True):
        assert torch.equal(acts[:, 0], torch.from_numpy(env.eval_acts[seqs, 0]))
        assert (logits[:, 0] - clean_logits[seqs, 0]).abs().max() < 1e-5


def test_max_tokens_limits_whole_sequences(tiny_llama, ds_ids, ds_train_mean):
    per_seq = CTX - 1
    env = make_env(tiny_llama, ds_ids, ds_train_mean, max_tokens=per_seq + 1)
    res = Downstream().run(FnSAE(lambda f: f), env)
    assert res.details["n_sequences"] == 2
    assert res.details["predicted_tokens"] == 2 * (CTX - 2)
    with torch.no_grad():
        want = ce_over_predictions(tiny_llama.logits(ds_ids[:2]), ds_ids[:2])
    assert abs(res.metrics["ce_clean"] - want) < 1e-5


@pytest.mark.parametrize("seqs_per_batch", [1, 3, 8])
def test_batching_does_not_change_results(tiny_llama, ds_ids, ds_train_mean, seqs_per_batch):
    fn = lambda f: 0.7 * f  # noqa: E731
    base = Downstream().run(FnSAE(fn), make_env(tiny_llama, ds_ids, ds_train_mean)).metrics
    env = make_env(tiny_llama, ds_ids, ds_train_mean, seqs_per_batch=seqs_per_batch)
    m = Downstream().run(FnSAE(fn), env).metrics
    for k in ("ce_clean", "ce_sae", "ce_zero", "ce_mean", "kl"):
        assert abs(m[k] - base[k]) < 1e-5, k


def test_ablation_losses_are_computed_once_per_env(tiny_llama, ds_ids, ds_train_mean, monkeypatch):
    """A second SAE in the same run reuses ce_zero / ce_mean and only pays for its own pass."""
    env = make_env(tiny_llama, ds_ids, ds_train_mean)
    real_run_from = tiny_llama.run_from
    rows: list[int] = []

    def counting_run_from(hook, acts, ids):
        rows.append(acts.shape[0])
        return real_run_from(hook, acts, ids)

    monkeypatch.setattr(tiny_llama, "run_from", counting_run_from)
    first = Downstream().run(FnSAE(lambda f: 0.5 * f), env).metrics
    after_first = sum(rows)
    second = Downstream().run(FnSAE(torch.zeros_like), env).metrics
    assert after_first == 2 * N_SEQ + 2  # clean + SAE, then zero + mean of one window
    assert sum(rows) - after_first == 2 * N_SEQ  # clean + SAE only
    assert second["ce_zero"] == first["ce_zero"] and second["ce_mean"] == first["ce_mean"]
    # The memo is right, not just reused: the zero SAE's own spliced loss equals ce_zero.
    assert abs(second["ce_sae"] - second["ce_zero"]) < 1e-5
