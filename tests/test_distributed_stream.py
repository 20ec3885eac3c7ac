"""Data parallel in stream mode (bench/train/batch_stream.py, bench/train/distributed.py): each rank
runs the subject model over its share of every shuffle block, the ranks exchange the
shares, and the batches, their order and the trained SAEs are those of one process.

Two real gloo processes (spawned here, and the CLI under torchrun) against references
computed in this process with the plain one-process stream. The blocks are small, so
the stream spans several of them, and the batch size is chosen so that some global
batch crosses a block boundary inside the second rank's slice: the case where the
ranks would read blocks at different steps if they only read their own rows.
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

from dictbench import cli, faults
from dictbench.data.cache import ActivationStore
from dictbench.data.corpus import keep_positions
from dictbench.data.subject import ModelSpec, SubjectModel
from dictbench.registry import get_baseline
from dictbench.spec import BudgetSpec
from dictbench.train import distributed
from dictbench.train.batch_stream import (
    HARVEST_CHUNK,
    CacheWindows,
    ModelWindows,
    ShuffleBuffer,
    block_windows_for,
    chunked_mean,
)
from dictbench.train.checkpoint import CheckpointPlan
from dictbench.train.lockstep import Member, train_group
from dictbench.train.trainer import TrainRecord

pytestmark = pytest.mark.slow  # minutes of multi-process runs: `make test-long`

HOOK, CTX, N_WINDOWS = "resid_post.1", 16, 96
KEEP = keep_positions(CTX)
KEPT = int(KEEP.sum())  # 15: 96 windows hold 1,440 training tokens
# Blocks of 32 windows (480 tokens, two model chunks: one per rank); 20 steps of 70.
TOKENS = BudgetSpec(train_tokens=1400, batch_size=70, d_sae=32, lr=3e-3, buffer_tokens=480)
# Whole-window batches (e2e): 6 windows a step, 3 per rank, 11 steps.
WINDOWS = BudgetSpec(train_tokens=990, batch_size=90, d_sae=32, lr=3e-3, buffer_tokens=480)
TOKEN_SAES = {"l1": {}, "topk": {"k": 4}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _token_ids() -> np.ndarray:
    ids = np.random.default_rng(0).integers(1, 257, (N_WINDOWS, CTX)).astype(np.int32)
    ids[:, 0] = 0
    return ids


def _block() -> int:
    return block_windows_for(TOKENS.buffer_tokens, KEPT, N_WINDOWS)


def _stream(subject, shared: bool) -> ModelWindows:
    return ModelWindows(subject, HOOK, _token_ids(), KEEP, ranks_share=shared)


def _cache(subject, tmp: str) -> CacheWindows:
    """A cache entry of the same windows, from a forward of them all in this process."""
    acts = _stream(subject, shared=False).read(0, N_WINDOWS)
    store = ActivationStore(Path(tmp), acts, _token_ids(), chunked_mean(acts, KEEP), {})
    return CacheWindows(store)


def _slices(buffer: ShuffleBuffer, world: int, rank: int) -> torch.Tensor:
    """One rank's rows of every global batch, as the training loop reads them."""
    n, per = TOKENS.batch_size, TOKENS.batch_size // world
    steps = TOKENS.train_tokens // n
    parts = [
        buffer.tokens(s * n + rank * per, s * n + (rank + 1) * per, (s * n, (s + 1) * n))
        for s in range(steps)
    ]
    return torch.cat(parts)


def _build(method: str, d: int, **params):
    cls = get_baseline(method)
    torch.manual_seed(0)
    return cls(cls.config_class(d_in=d, d_sae=TOKENS.d_sae, **params))


def _plan(folder: Path | None, sae_id: str, resume: bool) -> CheckpointPlan | None:
    if folder is None:
        return None
    path = folder / f"{sae_id}.safetensors"
    return CheckpointPlan(path, 4, {"test": 1}, resume=resume, log=lambda _m: None)


def _train(subject, make_source, folder=None, resume=False, e2e=True):
    """Every SAE trained in its lockstep group from fresh sources; (weights, forwards)."""
    d = int(subject.d_model)
    groups = [
        (False, TOKENS, [(m, _build(m, d, **p)) for m, p in TOKEN_SAES.items()]),
        (True, WINDOWS, [("e2e", _build("e2e", d))] if e2e else []),
    ]
    weights, forwarded = {}, 0
    for sequence_mode, budget, saes in groups:
        if not saes:
            continue
        members = [Member(s, i, budget.lr, ckpt=_plan(folder, i, resume)) for i, s in saes]
        source = make_source()
        buffer = ShuffleBuffer(source, KEEP, _block(), 0)
        out = train_group(members, buffer, budget, sequence_mode, subject, HOOK)
        assert all(isinstance(r, TrainRecord) for r in out.values()), out
        for m in members:
            weights.update({f"{m.sae_id}.{k}": v.detach().clone() for k, v in _state(m.sae)})
        forwarded += getattr(source, "windows_forwarded", 0)
    return weights, forwarded


def _state(sae) -> list[tuple[str, torch.Tensor]]:
    return [(k, v.contiguous()) for k, v in sae.state_dict().items()]


def _stopped_then_resumed(subject, folder: Path) -> dict[str, torch.Tensor]:
    """The token group stopped before step 6 (checkpoints at step 4), then resumed."""

    def stop(name: str) -> None:
        if name == "train:l1:step=6":
            raise KeyboardInterrupt

    real, faults.point = faults.point, stop
    try:
        _train(subject, lambda: _stream(subject, True), folder, e2e=False)
        raise AssertionError("the run was not stopped")
    except KeyboardInterrupt:
        pass
    finally:
        faults.point = real
    assert (folder / "l1.safetensors").exists()
    return _train(subject, lambda: _stream(subject, True), folder, resume=True, e2e=False)[0]


def _worker(rank: int, world: int, port: int, tmp: str, config: dict) -> None:
    os.environ.update(
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    os.environ[distributed.TIMEOUT_ENV] = "3"  # ranks out of step fail, not hang for a day
    torch.set_num_threads(1)
    distributed.init("cpu")
    try:
        subject = SubjectModel.load(ModelSpec(name="tiny:llama", device="cpu", config=config))
        source = _stream(subject, shared=True)
        rows = _slices(ShuffleBuffer(source, KEEP, _block(), 0), world, rank)
        save_file({"rows": rows}, f"{tmp}/rows-rank{rank}.safetensors")
        counts = {"batches": source.windows_forwarded}
        stream, counts["training"] = _train(subject, lambda: _stream(subject, True))
        save_file(stream, f"{tmp}/stream-rank{rank}.safetensors")
        save_file(_train(subject, lambda: _cache(subject, tmp))[0], f"{tmp}/cache-rank{rank}.st")
        resumed = _stopped_then_resumed(subject, Path(tmp) / "ckpt")
        save_file(resumed, f"{tmp}/resumed-rank{rank}.safetensors")
        Path(f"{tmp}/forwarded-rank{rank}.json").write_text(json.dumps(counts))
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_llama) -> Path:
    tmp = tmp_path_factory.mktemp("stream_two_ranks")
    config = dict(tiny_llama.spec.config)
    args = (2, _free_port(), str(tmp), config)
    mp.start_processes(_worker, args=args, nprocs=2, join=True, start_method="spawn")
    return tmp


@pytest.fixture(scope="module")
def one_process(tiny_llama) -> dict:
    """The references: the same reads and training with the model run over every window."""
    source = _stream(tiny_llama, shared=False)
    buffer = ShuffleBuffer(source, KEEP, _block(), 0)
    n = TOKENS.batch_size
    whole = [buffer.tokens(s * n, (s + 1) * n) for s in range(TOKENS.train_tokens // n)]
    rows = [torch.cat([b[: n // 2] for b in whole]), torch.cat([b[n // 2 :] for b in whole])]
    weights, forwarded = _train(tiny_llama, lambda: _stream(tiny_llama, False))
    return {"rows": rows, "batches": source.windows_forwarded, "training": forwarded, **weights}


def _rank(two_ranks: Path, kind: str, rank: int) -> dict[str, torch.Tensor]:
    name = f"{kind}-rank{rank}.st" if kind == "cache" else f"{kind}-rank{rank}.safetensors"
    return load_file(two_ranks / name)


def test_the_constants_make_a_batch_cross_a_block_inside_the_second_slice():
    per_block, n = _block() * KEPT, TOKENS.batch_size
    assert _block() == 2 * HARVEST_CHUNK and N_WINDOWS == 3 * _block()
    crossing = [
        s
        for s in range(TOKENS.train_tokens // n)
        if s * n + n // 2 < ((s + 1) * n // per_block) * per_block < (s + 1) * n
    ]
    assert crossing  # e.g. step 6: [420, 490), rank 1 holds [455, 490), the block ends at 480


def test_each_rank_reads_the_rows_of_one_process_bit_for_bit(two_ranks, one_process):
    for rank in range(2):
        got = load_file(two_ranks / f"rows-rank{rank}.safetensors")["rows"]
        assert torch.equal(got, one_process["rows"][rank]), rank
    assert not torch.equal(one_process["rows"][0], one_process["rows"][1])


def test_each_rank_forwards_half_of_the_windows(two_ranks, one_process):
    counts = [json.loads((two_ranks / f"forwarded-rank{r}.json").read_text()) for r in range(2)]
    # Reading the batches in order reads each of the 3 blocks once: 96 windows in one
    # process, one 16-window chunk of each block per rank.
    assert one_process["batches"] == N_WINDOWS
    assert [c["batches"] for c in counts] == [N_WINDOWS // 2, N_WINDOWS // 2]
    # Training also reads the scale and initialisation samples (blocks read again).
    assert one_process["training"] > N_WINDOWS
    assert [c["training"] for c in counts] == [one_process["training"] // 2] * 2


def test_two_ranks_stream_and_cache_train_bit_identical_saes(two_ranks):
    stream, cache = _rank(two_ranks, "stream", 0), _rank(two_ranks, "cache", 0)
    assert sorted(stream) == sorted(cache)
    for name, want in cache.items():
        assert torch.equal(stream[name], want), name
        assert torch.equal(_rank(two_ranks, "stream", 1)[name], want), f"rank 1: {name}"


def test_two_ranks_in_stream_mode_match_one_process(two_ranks, one_process, tiny_llama):
    """Within float rounding, as the cache-mode data-parallel tests: the batches are the
    same bits, but the average of two half-batch gradients rounds differently from
    the gradient of the whole batch."""
    got = _rank(two_ranks, "stream", 0)
    d = int(tiny_llama.d_model)
    for sae_id in [*TOKEN_SAES, "e2e"]:
        init = _build(sae_id, d, **TOKEN_SAES.get(sae_id, {})).W_enc.detach()
        want = one_process[f"{sae_id}.W_enc"]
        assert (want - init).abs().max() > 1e-2, sae_id  # training moved it: the check bites
    for name, got_value in got.items():
        torch.testing.assert_close(got_value, one_process[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_stopped_two_rank_stream_resumes_to_the_same_weights(two_ranks):
    whole = _rank(two_ranks, "stream", 0)
    for rank in range(2):
        resumed = _rank(two_ranks, "resumed", rank)
        assert sorted(resumed) == sorted(k for k in whole if not k.startswith("e2e."))
        for name, value in resumed.items():
            assert torch.equal(value, whole[name]), (rank, name)


# --- the CLI under torchrun, in stream mode ----------------------------------------------


@pytest.fixture(scope="module")
def stream_spec(tmp_path_factory, tiny_spec_factory) -> Path:
    base = tmp_path_factory.mktemp("torchrun_stream")
    data = tiny_spec_factory(base / "cache")
    data["model"]["device"] = "cpu"
    # Blocks of 32 windows (480 tokens); 210 tokens a step, or 14 windows (7 a rank).
    data["budget"].update(source="stream", buffer_tokens=480, batch_size=210)
    data["baselines"] = [
        {"method": "l1", "params": {"l1_coefficient": 1.0}},
        {"method": "batchtopk", "params": {"k": 4, "dead_tokens_threshold": 240}},
        {"method": "e2e"},
    ]
    data["tasks"] = ["sparsity", "reconstruction"]
    data["checkpoint_every_steps"] = 5
    path = base / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _torchrun(spec: Path, out: Path, *extra: str, kill_at: str | None = None):
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    env.pop(faults.ENV, None)
    if kill_at is not None:
        env[faults.ENV] = kill_at  # every rank kills itself there with SIGKILL
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    argv = [*launch, "2", "-m", "dictbench.cli", "run", str(spec), "--out", str(out), *extra]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def torchrun_stream(stream_spec) -> Path:
    out = stream_spec.parent / "two"
    res = _torchrun(stream_spec, out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("results in") == 1  # rank 0 alone reports
    return out


def _weights(run: Path, sae_id: str) -> dict[str, torch.Tensor]:
    return load_file(run / "saes" / sae_id / "sae_weights.safetensors")


def _metrics(run: Path, sae_id: str, task: str) -> dict:
    return json.loads((run / "results" / sae_id / f"{task}.json").read_text())["metrics"]


SAE_IDS = ("l1", "batchtopk", "e2e")


def test_torchrun_stream_matches_one_process(stream_spec, torchrun_stream, torch_one_thread):
    one = stream_spec.parent / "one"
    assert cli.main(["run", str(stream_spec), "--out", str(one)]) == 0
    info = json.loads((torchrun_stream / "run.json").read_text())
    assert info["status"] == "complete" and info["data_parallel"]["world_size"] == 2
    assert info["training_source"] == "stream" and info["caches"]["train"] is None
    cache = stream_spec.parent / "cache"
    assert not [p for p in cache.iterdir() if p.name.startswith("train-")]  # no disk
    for sae_id in SAE_IDS:
        want, got = _weights(one, sae_id), _weights(torchrun_stream, sae_id)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)
        m1 = _metrics(one, sae_id, "reconstruction")
        m2 = _metrics(torchrun_stream, sae_id, "reconstruction")
        assert m2["explained_variance"] == pytest.approx(m1["explained_variance"], abs=1e-4)


def test_torchrun_stream_killed_and_resumed_equals_the_uninterrupted_run(
    stream_spec, torchrun_stream
):
    out = stream_spec.parent / "killed"
    killed = _torchrun(stream_spec, out, kill_at="train:l1:step=7")
    assert killed.returncode != 0
    assert (out / "checkpoints" / "l1.safetensors").exists()
    resumed = _torchrun(stream_spec, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = resumed.stdout + resumed.stderr
    assert "l1: resuming training at step 5 of 19" in said
    assert "batchtopk: resuming training at step 5 of 19" in said
    for sae_id in SAE_IDS:
        want, got = _weights(torchrun_stream, sae_id), _weights(out, sae_id)
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want), sae_id
        for task in ("sparsity", "reconstruction"):
            assert _metrics(out, sae_id, task) == _metrics(torchrun_stream, sae_id, task)
