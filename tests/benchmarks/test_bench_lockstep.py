"""Lockstep against one-at-a-time training of a small sweep on one cached store.

What it shows: the batch work (a block read and the per-step row gather) is paid once per
step for the whole group instead of once per SAE; the SAE steps themselves are the same
work either way. Whole-pipeline figures on the embedded model (stream vs cache vs the
first version's path, peak RSS, disk): scripts/perf/lockstep_sweep.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dictbench import registry
from dictbench.data.cache import ActivationStore
from dictbench.spec import BudgetSpec
from dictbench.train.batch_stream import CacheWindows, ShuffleBuffer, block_windows_for
from dictbench.train.lockstep import Member, train_group

D, CTX, N_WINDOWS = 256, 129, 512
BUDGET = BudgetSpec(train_tokens=32768, batch_size=1024, d_sae=1024)
SWEEP = [("l1", {}), ("topk", {"k": 16}), ("batchtopk", {"k": 16})]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(N_WINDOWS, CTX, D)).astype(np.float32)
    tokens = np.zeros((N_WINDOWS, CTX), np.int32)
    return ActivationStore(tmp_path_factory.mktemp("s"), acts, tokens, acts.mean((0, 1)), {})


def _members(d_in: int) -> list[Member]:
    out = []
    for method, params in SWEEP:
        cls = registry.get_baseline(method)
        torch.manual_seed(0)
        sae = cls(cls.config_class(d_in=d_in, d_sae=BUDGET.d_sae, **params))
        out.append(Member(sae, method, 1e-3))
    return out


def _buffer(store) -> ShuffleBuffer:
    block = block_windows_for(BUDGET.buffer_tokens, CTX - 1, N_WINDOWS)
    return ShuffleBuffer(CacheWindows(store), store.keep, block, 0)


@pytest.mark.parametrize("how", ["lockstep", "one_at_a_time"])
def test_sweep_of_three(benchmark, store, how):
    def run() -> None:
        members = _members(D)
        if how == "lockstep":
            train_group(members, _buffer(store), BUDGET, sequence_mode=False)
        else:
            for m in members:
                train_group([m], _buffer(store), BUDGET, sequence_mode=False)

    benchmark.pedantic(run, rounds=2, iterations=1)
