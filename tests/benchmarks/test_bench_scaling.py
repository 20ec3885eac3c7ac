"""dictbench's fast paths next to the reference way of doing the same work.

Each group pairs a dictbench path with the usual implementation of the same math on the
same inputs (the references live in scripts/perf/, which also draws the curves):

- ``topk-step-<d_sae>``: TopK/BatchTopK training step, sparse decoder path vs dense z;
- ``harvest``: the activation harvest vs the model run to the hook alone;
- ``downstream-<hook>``: the downstream task vs four full forwards (SAEBench's way);
- ``e2e-<hook>``: e2e step from cached activations vs the whole model from tokens.

pytest-benchmark times the cases one after another, so on a shared machine compare a
group's members only when the load was steady; ``scripts/perf/*.py`` time them
interleaved and report paired ratios. Each case also checks its two sides agree.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_helpers import BATCH, D_IN, train_step

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "perf"))

import downstream as ds_perf  # noqa: E402
import e2e_step as e2e_perf  # noqa: E402
import harvest as harvest_perf  # noqa: E402
import topk_scaling as topk_perf  # noqa: E402

from dictbench import registry  # noqa: E402
from dictbench.data.corpus import CorpusSpec, make_windows  # noqa: E402

SIZES = [2304, 9216, 36864]


@pytest.mark.sae_step
@pytest.mark.parametrize("d_sae", SIZES)
@pytest.mark.parametrize("method", ["topk", "batchtopk"])
@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_topk_step_scaling(benchmark, impl, method, d_sae):
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(BATCH, D_IN, generator=g) * 0.9 + 0.3
    (sparse, opt_s), (dense, opt_d) = topk_perf.build_pair(method, d_sae, batch)
    sae, opt = (sparse, opt_s) if impl == "sparse" else (dense, opt_d)
    del sparse, dense, opt_s, opt_d
    train_step(sae, opt, batch, 0)
    steps = iter(range(1, 10_000))
    benchmark.group = f"topk-step-{d_sae}"
    benchmark.extra_info.update(d_in=D_IN, d_sae=d_sae, k=topk_perf.K, batch_tokens=BATCH)
    loss = benchmark.pedantic(
        lambda: train_step(sae, opt, batch, next(steps)), rounds=3, iterations=1
    )
    assert np.isfinite(loss)


def test_topk_paths_agree():
    """Not a timing: the two sides of topk-step compute the same loss and gradients."""
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(512, D_IN, generator=g) * 0.9 + 0.3
    for method in ("topk", "batchtopk"):
        (sparse, _), (dense, _) = topk_perf.build_pair(method, 2304, batch)
        agree = topk_perf.check_agreement(sparse, dense, batch)
        assert agree["loss_rel_diff"] < 1e-5 and agree["grad_max_rel_diff"] < 1e-4, agree


HOOK_HARVEST = "resid_post.6"


@pytest.fixture(scope="module")
def harvest_windows(smollm2) -> np.ndarray:
    # The windows test_harvest (test_bench_pipeline.py) uses: 33 windows of 128 tokens.
    return make_windows(smollm2.tokenizer, CorpusSpec(ctx_len=128), "train", 33, 0)


@pytest.mark.smollm2
@pytest.mark.parametrize("what", ["harvest", "model_alone"])
def test_harvest_vs_model(benchmark, smollm2, harvest_windows, tmp_path, what):
    pending = harvest_perf.pending_for(smollm2, HOOK_HARVEST, harvest_windows, tmp_path / "e")
    rounds = iter(range(1000))

    def harvest() -> None:
        target = dataclasses.replace(pending, final=tmp_path / f"r{next(rounds)}" / "entry")
        harvest_perf.run_harvest(smollm2, HOOK_HARVEST, target, log=harvest_perf.quiet)

    def alone() -> None:
        harvest_perf.model_alone(smollm2, HOOK_HARVEST, harvest_windows)

    benchmark.group = f"harvest-{HOOK_HARVEST}"
    benchmark.extra_info.update(hook=HOOK_HARVEST, positions=int(harvest_windows.size))
    benchmark.pedantic(harvest if what == "harvest" else alone, rounds=3, iterations=1)


@pytest.fixture(scope="module")
def ds_envs(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("perf_ds")
    return {h: ds_perf.make_env(smollm2, h, 4, root) for h in ("resid_post.6", "resid_post.15")}


@pytest.mark.smollm2
@pytest.mark.parametrize("hook", ["resid_post.15", "resid_post.6"])
@pytest.mark.parametrize("what", ["dictbench_cold", "dictbench_warm", "saebench"])
def test_downstream_vs_saebench(benchmark, smollm2, ds_envs, hook, what):
    """4 windows (504 predictions). cold: one SAE in a fresh run (the ablations too);
    warm: a further SAE of the same run; saebench: four full forwards from tokens."""
    env = ds_envs[hook]
    task = registry.get_task("downstream")()
    sae = ds_perf.untrained_l1()
    ours = task.run(sae, env).metrics
    ref = ds_perf.saebench_way(smollm2, env, sae)
    assert max(abs(ours[k] - ref[k]) for k in ref) < 1e-4

    def cold() -> None:
        env.shared.clear()
        task.run(sae, env)

    fn = {
        "dictbench_cold": cold,
        "dictbench_warm": lambda: task.run(sae, env),
        "saebench": lambda: ds_perf.saebench_way(smollm2, env, sae),
    }[what]
    benchmark.group = f"downstream-{hook}"
    benchmark.extra_info.update(hook=hook, predictions=int(env.eval_acts.shape[0] * 126))
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.smollm2
@pytest.mark.parametrize("hook", ["resid_post.6", "resid_post.15"])
@pytest.mark.parametrize("what", ["dictbench_cached", "whole_model"])
def test_e2e_vs_whole_model(benchmark, smollm2, hook, what):
    """One e2e step on 2 windows of 128 tokens, both ways, from identical weights."""
    windows = make_windows(smollm2.tokenizer, CorpusSpec(ctx_len=128), "train", 2, 0)
    ids = torch.from_numpy(windows.astype(np.int64))
    batch, ours, ref = e2e_perf.build(smollm2, hook, "e2e", ids)
    agree = e2e_perf.agreement(ours, ref, batch)
    assert agree["loss_rel_diff"] < 1e-4 and agree["grad_max_rel_diff"] < 1e-3, agree
    sae = ours if what == "dictbench_cached" else ref
    opt = e2e_perf.make_optimizer(sae.parameters())
    steps = iter(range(10_000))
    benchmark.group = f"e2e-{hook}"
    benchmark.extra_info.update(hook=hook, tokens_per_step=int(ids.numel()))
    loss = benchmark.pedantic(
        lambda: train_step(sae, opt, batch, next(steps)), rounds=3, iterations=1, warmup_rounds=1
    )
    assert np.isfinite(loss)
