"""Data-parallel training (bench/train/distributed.py) against independent one-process runs.

Two gloo processes that split every batch must end with the weights one process gets
from the whole batch (up to float rounding), for every built-in method, including
those whose loss looks across the batch (BatchTopK's batch-wide top k, AuxK's batch
variance and dead-latent counts). The references are computed here, in this process,
with the plain one-process trainer.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file, save_file

from dictbench import cli, registry
from dictbench.data.cache import ActivationStore
from dictbench.errors import UserError
from dictbench.report import leaderboard
from dictbench.runner import PlannedSAE
from dictbench.spec import BudgetSpec
from dictbench.train import distributed
from dictbench.train.checkpoint import CheckpointPlan
from dictbench.train.lockstep import Member
from dictbench.train.trainer import train

D_IN, D_SAE, CTX, WINDOWS = 16, 32, 17, 64  # 64 windows x 16 kept positions = 1024 tokens
BUDGET = dict(train_tokens=1024, batch_size=128, d_sae=D_SAE, lr=3e-3)  # 8 steps
METHODS = {
    "l1": {"l1_coefficient": 0.5},
    # AuxK switches on once a latent misses a whole batch (128 tokens): it runs in this test.
    "topk": {"k": 1, "dead_tokens_threshold": 64},
    "batchtopk": {"k": 1, "dead_tokens_threshold": 64},
    "jumprelu": {},
    "gated": {"l1_coefficient": 0.5},
}


def _store(tmp: Path) -> ActivationStore:
    """Sparse combinations of 48 random directions: every method has something to learn."""
    rng = np.random.default_rng(0)
    dirs = rng.standard_normal((48, D_IN)).astype(np.float32)
    coef = rng.exponential(1.0, (WINDOWS * CTX, 48)) * (rng.random((WINDOWS * CTX, 48)) < 0.08)
    acts = (coef @ dirs).astype(np.float32).reshape(WINDOWS, CTX, D_IN) + 0.5
    tokens = np.zeros((WINDOWS, CTX), dtype=np.int32)
    return ActivationStore(tmp, acts, tokens, acts.mean((0, 1)), {"fingerprint": "test"})


def _train_one(method: str, store: ActivationStore, ckpt: CheckpointPlan | None = None):
    cls = registry.get_baseline(method)
    torch.manual_seed(0)
    sae = cls(cls.config_class(d_in=D_IN, d_sae=D_SAE, **METHODS[method]))
    rec = train(Member(sae, method, BUDGET["lr"], ckpt=ckpt), store, BudgetSpec(**BUDGET), 0)
    return sae, rec


def _state(sae: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in sae.state_dict().items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _interrupted_then_resumed(store: ActivationStore, folder: Path) -> torch.nn.Module:
    """BatchTopK stopped before step 6 (checkpoint at step 4), then run with --resume."""
    from dictbench import faults

    plan = CheckpointPlan(folder / "batchtopk.safetensors", 4, {"test": 1}, log=lambda _m: None)

    def interrupt(name: str) -> None:
        if name == "train:batchtopk:step=6":
            raise KeyboardInterrupt

    real_point, faults.point = faults.point, interrupt
    try:
        _train_one("batchtopk", store, plan)
    except KeyboardInterrupt:
        pass
    finally:
        faults.point = real_point
    assert plan.path.exists()
    plan.resume = True
    return _train_one("batchtopk", store, plan)[0]


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    """One rank: train every method with its batch shard; then an interrupted run that
    resumes from rank 0's checkpoint. Writes its weights and records for the parent."""
    os.environ.update(
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    distributed.init("cpu")
    try:
        store = _store(Path(tmp))
        records = {}
        for method in METHODS:
            sae, rec = _train_one(method, store)
            save_file(_state(sae), f"{tmp}/{method}-rank{rank}.safetensors")
            records[method] = {"terms": rec.final_terms, "dead": rec.train_frac_dead}
        Path(f"{tmp}/records-rank{rank}.json").write_text(json.dumps(records))

        sae = _interrupted_then_resumed(store, Path(tmp) / "ckpt")
        save_file(_state(sae), f"{tmp}/resumed-rank{rank}.safetensors")
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("two_ranks")
    mp.start_processes(
        _worker, args=(2, _free_port(), str(tmp)), nprocs=2, join=True, start_method="spawn"
    )
    return tmp


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, two_ranks):
    """The references: each method trained on whole batches in this process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tmp = tmp_path_factory.mktemp("one_process")
        store = _store(tmp)
        refs = {m: _train_one(m, store) for m in METHODS}
        refs["resumed"] = _interrupted_then_resumed(store, tmp / "ckpt")
        return refs
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("method", list(METHODS))
def test_two_ranks_equal_one_process(method, two_ranks, one_process):
    ref_sae, ref_rec = one_process[method]
    ref = _state(ref_sae)
    r0 = load_file(two_ranks / f"{method}-rank0.safetensors")
    r1 = load_file(two_ranks / f"{method}-rank1.safetensors")
    for name, want in ref.items():
        assert torch.equal(r0[name], r1[name]), f"{method}.{name}: the ranks differ"
        torch.testing.assert_close(r0[name], want, rtol=1e-4, atol=1e-5, msg=f"{method}.{name}")
    # The training moved the weights far more than the tolerance: the check has teeth.
    torch.manual_seed(0)
    cls = registry.get_baseline(method)
    init = cls(cls.config_class(d_in=D_IN, d_sae=D_SAE, **METHODS[method])).W_enc.detach()
    assert (ref["W_enc"] - init).abs().max() > 1e-2
    records = json.loads((two_ranks / "records-rank0.json").read_text())[method]
    for term, value in ref_rec.final_terms.items():
        assert records["terms"][term] == pytest.approx(value, rel=1e-4, abs=1e-6), term
    assert records["dead"] == pytest.approx(ref_rec.train_frac_dead)


def test_auxk_ran_in_the_comparison(one_process):
    """The TopK family's comparison covers the batch-coupled AuxK term, not just MSE."""
    for method in ("topk", "batchtopk"):
        _sae, rec = one_process[method]
        assert rec.final_terms["auxk"] > 0, method


def test_resume_in_two_ranks_matches_resume_in_one_process(two_ranks, one_process):
    """Every rank continues from rank 0's checkpoint, as one process does from its own.
    (Against an uninterrupted run it is the one-process resume that is on trial.)"""
    want = _state(one_process["resumed"])
    r0 = load_file(two_ranks / "resumed-rank0.safetensors")
    r1 = load_file(two_ranks / "resumed-rank1.safetensors")
    for name, value in want.items():
        assert torch.equal(r0[name], r1[name]), name
        torch.testing.assert_close(r0[name], value, rtol=1e-4, atol=1e-5, msg=name)


# --- refusals -----------------------------------------------------------------------------


class _OddBaseline(torch.nn.Module):
    """A third-party method nobody checked for data parallelism."""


@pytest.fixture
def fake_two_ranks(monkeypatch):
    monkeypatch.setattr(distributed, "_GROUP", distributed.Group(0, 2, 0, "gloo", None))


def _planned(method: str) -> PlannedSAE:
    return PlannedSAE(method, method, registry.get_baseline(method), {})


def test_refusals_name_what_cannot_be_split(fake_two_ranks):
    distributed.refuse_unsupported([_planned("l1"), _planned("batchtopk")], 256, 16)
    with pytest.raises(UserError, match="batch_size 255 does not divide into 2"):
        distributed.refuse_unsupported([_planned("l1")], 255, 17)
    with pytest.raises(UserError, match="'e2e' trains on 17 whole windows"):
        distributed.refuse_unsupported([_planned("e2e")], 256, 17)
    odd = PlannedSAE("odd", "mod:Odd", _OddBaseline, {})
    with pytest.raises(UserError, match="'mod:Odd'.*not known to train exactly"):
        distributed.refuse_unsupported([odd], 256, 16)
    # A subclass inherits no promise: its loss may differ from the checked parent's.
    sub = type("SubL1", (registry.get_baseline("l1"),), {})
    with pytest.raises(UserError, match="not known to train exactly"):
        distributed.refuse_unsupported([PlannedSAE("s", "m:SubL1", sub, {})], 256, 16)
    declared = type("Declared", (_OddBaseline,), {"data_parallel_exact": True})
    distributed.refuse_unsupported([PlannedSAE("d", "m:Declared", declared, {})], 256, 16)


def test_torchrun_refuses_a_device_that_pins_every_rank_to_one_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed, "_GROUP", None)
    with pytest.raises(UserError, match="'cuda:1' names one GPU for every process"):
        distributed.init("cuda:1")
    assert distributed.group() is None


# --- the real CLI under torchrun, and sweeps split with --shard ----------------------------


def _spec_file(tmp_path: Path, data: dict, **budget) -> Path:
    data = json.loads(json.dumps(data))
    data["model"]["device"] = "cpu"
    data["budget"].update(budget)
    data["tasks"] = ["sparsity", "reconstruction"]
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _weights(run: Path, sae_id: str) -> dict[str, torch.Tensor]:
    return load_file(run / "saes" / sae_id / "sae_weights.safetensors")


def _metrics(run: Path, sae_id: str, task: str) -> dict:
    return json.loads((run / "results" / sae_id / f"{task}.json").read_text())["metrics"]


def test_torchrun_two_processes_match_one(tmp_path, tiny_spec_data, torch_one_thread):
    data = dict(tiny_spec_data)
    # 240 tokens = 16 whole windows of 15 kept positions: e2e splits 8 + 8.
    data["baselines"] = [
        {"method": "l1", "params": {"l1_coefficient": 1.0}},
        {"method": "batchtopk", "params": {"k": 4, "dead_tokens_threshold": 240}},
        {"method": "e2e"},
    ]
    # The cache source named (stream mode: tests/test_distributed_stream.py).
    spec = _spec_file(tmp_path, data, batch_size=240, source="cache")
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(["run", str(spec), "--out", str(one)]) == 0
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    res = subprocess.run(
        [*launch, "--nproc_per_node", "2", "-m", "dictbench.cli", "run", str(spec)]
        + ["--out", str(two)],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((two / "run.json").read_text())
    assert info["status"] == "complete" and info["data_parallel"]["world_size"] == 2
    assert info["training_source"] == "cache"
    assert res.stdout.count("results in") == 1  # rank 0 alone reports
    for sae_id in ("l1", "batchtopk", "e2e"):
        want, got = _weights(one, sae_id), _weights(two, sae_id)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
        m1, m2 = _metrics(one, sae_id, "reconstruction"), _metrics(two, sae_id, "reconstruction")
        assert m2["explained_variance"] == pytest.approx(m1["explained_variance"], abs=1e-4)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_shards_of_a_sweep_merge_into_one_run(tmp_path, tiny_spec_data, torch_one_thread):
    data = dict(tiny_spec_data)
    data["baselines"] = [{"method": "l1", "sweep": {"l1_coefficient": [0.3, 1.0, 3.0]}}]
    spec = _spec_file(tmp_path, data)
    whole, s0, s1 = tmp_path / "whole", tmp_path / "s0", tmp_path / "s1"
    assert cli.main(["run", str(spec), "--out", str(whole)]) == 0
    assert cli.main(["run", str(spec), "--shard", "0/2", "--out", str(s0)]) == 0
    assert cli.main(["run", str(spec), "--shard", "1/2", "--out", str(s1)]) == 0
    ids = ["l1-l1_coefficient=0.3", "l1-l1_coefficient=1", "l1-l1_coefficient=3"]
    assert sorted(p.name for p in (s0 / "saes").iterdir()) == [ids[0], ids[2]]
    assert sorted(p.name for p in (s1 / "saes").iterdir()) == [ids[1]]
    for sae_id, shard in zip(ids, (s0, s1, s0), strict=True):
        want, got = _weights(whole, sae_id), _weights(shard, sae_id)
        assert all(torch.equal(got[k], want[k]) for k in want), sae_id

    runs = leaderboard.load_runs([s0, s1])
    assert [r.label for r in runs] == ["tiny"]
    saes = leaderboard.sae_frame(runs)
    assert sorted(saes["sae_id"]) == ids and set(saes["method"]) == {"l1"}
    board = leaderboard.build(runs)
    assert set(board.matched["n_saes"]) == {3}
    ref = leaderboard.sae_frame(leaderboard.load_runs([whole])).set_index("sae_id")
    merged = saes.set_index("sae_id")
    assert np.allclose(merged.loc[ids, "l0"], ref.loc[ids, "l0"])

    with pytest.raises(UserError, match="given twice"):
        leaderboard.load_runs([s0, s1, _copy(s0, tmp_path / "s0b")])
    assert cli.main(["run", str(spec), "--shard", "3/2"]) == 2


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# --- a cache folder shared by several processes --------------------------------------------


def test_two_harvests_of_one_entry_at_once_share_one_harvest(tmp_path, tiny_llama, corpus_spec):
    """Two harvesters of the same entry at the same moment (shards or machines sharing
    cache_dir): one harvests, the other waits for it and reuses the entry. Threads with
    their own file descriptors take the same kernel lock (flock) two processes would."""
    import threading
    import time

    from dictbench.data.cache import EntryRequest, harvest

    root = tmp_path / "shared_cache"
    together = threading.Barrier(2)
    real = tiny_llama.run_to

    def slow(hook, ids):  # widen the window in which both would harvest
        time.sleep(0.3)
        return real(hook, ids)

    results: list[tuple[list[str], float]] = []

    def one() -> None:
        lines: list[str] = []
        together.wait()
        store = harvest(
            tiny_llama,
            "resid_post.1",
            EntryRequest(corpus_spec, "train", 600, 0),
            root,
            log=lines.append,
        )
        results.append((lines, float(np.asarray(store.acts, dtype=np.float64).sum())))

    tiny_llama.run_to = slow
    try:
        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        tiny_llama.run_to = real
    assert len(results) == 2
    harvested = [any("harvested" in line for line in lines) for lines, _ in results]
    assert sorted(harvested) == [False, True]  # one harvest; the other reused it
    waited = [any("waiting for it" in line for line in lines) for lines, _ in results]
    assert harvested.index(False) == waited.index(True)  # the reuser waited for the harvest
    assert results[0][1] == results[1][1]  # both read the same activations
    entries = sorted(p.name for p in root.iterdir())
    assert len(entries) == 1 and entries[0].startswith("train-"), entries  # no tmp, no lock
    ActivationStore.open(root / entries[0])  # complete and checksummed


@pytest.fixture
def corpus_spec(tiny_corpus_dir):
    from dictbench.data.corpus import CorpusSpec

    return CorpusSpec(
        name="local",
        data_files=[str(tiny_corpus_dir / "*.txt")],
        format="text",
        ctx_len=16,
        eval_fraction=0.3,
    )
