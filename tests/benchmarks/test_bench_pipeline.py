"""The activation harvest and the downstream evaluation on the real SmolLM2 model.

Small token counts so a benchmark round takes seconds; throughput scales linearly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from bench_helpers import D_IN, D_SAE

from dictbench import registry
from dictbench.data.cache import EntryRequest, PendingHarvest, prepare, run_harvest
from dictbench.data.corpus import CorpusSpec
from dictbench.tasks.base import TaskEnv

pytestmark = pytest.mark.smollm2

HOOK = "resid_post.6"
CORPUS = CorpusSpec(ctx_len=128)
HARVEST_TOKENS = 4096  # 33 windows of 128
EVAL_TOKENS = 508  # 4 windows of 128: 504 predictions per ablation variant


@pytest.fixture(scope="module")
def pending(smollm2, tmp_path_factory) -> PendingHarvest:
    """Token windows chosen once (tokenising the corpus is not part of the harvest)."""
    root = tmp_path_factory.mktemp("bench_cache")
    request = EntryRequest(CORPUS, "train", HARVEST_TOKENS, 0)
    p = prepare(smollm2, HOOK, request, root, log=lambda _m: None)
    assert isinstance(p, PendingHarvest)
    return p


def test_harvest(benchmark, smollm2, pending, tmp_path):
    rounds = iter(range(1000))

    def harvest_fresh() -> int:
        # A new entry each round: a reused entry would measure a cache hit.
        target = dataclasses.replace(pending, final=tmp_path / f"r{next(rounds)}" / "entry")
        return run_harvest(smollm2, HOOK, target, log=lambda _m: None).n_tokens

    n = pending.tokens.size
    benchmark.extra_info.update(hook=HOOK, tokens=int(n))
    kept = benchmark.pedantic(harvest_fresh, rounds=3, iterations=1)
    assert kept > 0


@pytest.fixture(scope="module")
def eval_env(smollm2, tmp_path_factory) -> TaskEnv:
    root: Path = tmp_path_factory.mktemp("bench_eval")
    quiet = lambda _m: None  # noqa: E731
    store = run_harvest(
        smollm2,
        HOOK,
        prepare(smollm2, HOOK, EntryRequest(CORPUS, "eval", EVAL_TOKENS, 0), root, quiet),
        log=quiet,
    )
    return TaskEnv(
        eval_acts=store.acts,
        eval_token_ids=store.tokens,
        keep_positions=store.keep,
        train_mean=np.asarray(store.mean),
        hook=HOOK,
        subject=smollm2,
        device="cpu",
    )


def _l1_sae() -> torch.nn.Module:
    torch.manual_seed(0)
    cls = registry.get_baseline("l1")
    return cls(cls.config_class(d_in=D_IN, d_sae=D_SAE)).eval()


def test_downstream_eval(benchmark, eval_env):
    """What each SAE of a run pays: the clean and spliced forwards of the layers after
    the hook. The zero- and mean-ablated losses are computed once per run and memoised
    in the environment; the warm-up round pays for them, outside the timing."""
    task = registry.get_task("downstream")()
    sae = _l1_sae()
    benchmark.extra_info.update(hook=HOOK, eval_tokens=eval_env.n_eval_tokens)
    result = benchmark.pedantic(
        lambda: task.run(sae, eval_env), rounds=3, iterations=1, warmup_rounds=1
    )
    assert np.isfinite(result.metrics["ce_clean"])


def test_token_tasks_eval(benchmark, eval_env):
    """sparsity, reconstruction, shrinkage and dead_latents in their shared pass."""
    names = ["sparsity", "reconstruction", "shrinkage", "dead_latents"]
    tasks = [registry.get_task(n)() for n in names]
    sae = _l1_sae()

    def run() -> list:
        accs = [t.accumulator(sae, eval_env) for t in tasks]
        return eval_env.token_pass(sae, accs)

    benchmark.extra_info.update(eval_tokens=eval_env.n_eval_tokens)
    results = benchmark.pedantic(run, rounds=5, iterations=1)
    assert len(results) == len(names)
