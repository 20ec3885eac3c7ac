"""Checkpoints (bench/train/checkpoint.py) and resumed training in one process.

Training is interrupted by making the test-only crash point raise instead of kill,
then continued by a fresh SAE built the way the runner builds one. The result must
be bit-identical to an uninterrupted run, for every built-in method: optimiser
moments, RNG streams, dead-latent counters (TopK), EMA thresholds (BatchTopK) and
plain attributes set by ``on_train_start`` (JumpReLU's input scale) all matter.
"""

from __future__ import annotations

import json
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic_sparse import D, sparse_store

from dictbench import registry
from dictbench.data.cache import EntryRequest, harvest
from dictbench.data.corpus import CorpusSpec
from dictbench.spec import BudgetSpec
from dictbench.train import trainer
from dictbench.train.checkpoint import CheckpointError, CheckpointPlan, TrainState, load, read, save
from dictbench.train.lockstep import Member
from tests.method_names import local_methods, short_run_params

pytestmark = pytest.mark.usefixtures("torch_one_thread")

BUDGET = BudgetSpec(train_tokens=64 * 20, batch_size=64, d_sae=128, lr=3e-3)  # 20 steps
LOCAL_METHODS = local_methods()  # every registered method that trains on activations alone


class Interrupt(Exception):
    pass


def build(method: str, d_in: int = D, d_sae: int = 128, seed: int = 0):
    cls = registry.get_baseline(method)
    torch.manual_seed(seed)
    params = short_run_params(method, k=4, dead_tokens_threshold=256)
    return cls(cls.config_class(d_in=d_in, d_sae=d_sae, **params))


def interrupt_at(monkeypatch, sae_id: str, step: int) -> None:
    def point(name: str) -> None:
        if name == f"train:{sae_id}:step={step}":
            raise Interrupt(name)

    monkeypatch.setattr(trainer.faults, "point", point)


def plan(path: Path, every: int, resume: bool, log: list[str] | None = None) -> CheckpointPlan:
    sink = log if log is not None else []
    return CheckpointPlan(path, every, {"test": "identity"}, resume=resume, log=sink.append)


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return sparse_store(tmp_path_factory.mktemp("ckpt_store"), BUDGET.train_tokens)


@pytest.mark.parametrize("method", LOCAL_METHODS)
def test_interrupted_and_resumed_training_is_bit_identical(method, store, tmp_path, monkeypatch):
    ref = build(method)
    rec_ref = trainer.train(Member(ref, "s", 3e-3), store, BUDGET, seed=3)

    path = tmp_path / "s.safetensors"
    interrupt_at(monkeypatch, "s", 13)
    with pytest.raises(Interrupt):
        trainer.train(
            Member(build(method), "s", 3e-3, ckpt=plan(path, 4, False)), store, BUDGET, seed=3
        )
    assert read(path)[1]["step"] == 12  # saved after steps 3, 7, 11: the last is step 12
    monkeypatch.undo()

    torch.manual_seed(999)  # whatever the RNG did meanwhile must not matter
    np.random.seed(999)
    log: list[str] = []
    resumed = build(method)
    rec = trainer.train(
        Member(resumed, "s", 3e-3, ckpt=plan(path, 4, True, log)), store, BUDGET, seed=3
    )
    assert log == [f"s: resuming training at step 12 of 20 ({path})"]
    assert states_equal(resumed, ref)
    assert rec.final_terms == rec_ref.final_terms
    assert rec.train_frac_dead == rec_ref.train_frac_dead
    assert (rec.steps, rec.tokens, rec.input_scale) == (
        rec_ref.steps,
        rec_ref.tokens,
        1.0 * rec_ref.input_scale,
    )
    if method == "jumprelu":  # a plain attribute, rebuilt by on_train_start on resume
        assert resumed.input_rms == ref.input_rms


def test_e2e_resumes_bit_identically_in_sequence_mode(
    tiny_llama, tiny_corpus_dir, tmp_path, monkeypatch
):
    corpus = CorpusSpec(
        name="local",
        data_files=[str(tiny_corpus_dir / "*.txt")],
        format="text",
        ctx_len=16,
        eval_fraction=0.3,
    )
    st = harvest(
        tiny_llama,
        "resid_post.1",
        EntryRequest(corpus, "train", 900, 0),
        tmp_path / "c",
        log=lambda m: None,
    )
    budget = BudgetSpec(train_tokens=60 * 12, batch_size=60, d_sae=64)  # 4 windows of 15 a step
    d = tiny_llama.d_model

    def go(ckpt=None):
        sae = build("e2e", d_in=d, d_sae=64)
        rec = trainer.train(
            Member(sae, "e", 1e-3, ckpt=ckpt),
            st,
            budget,
            0,
            subject=tiny_llama,
            hook="resid_post.1",
        )
        return sae, rec

    ref, rec_ref = go()
    path = tmp_path / "e.safetensors"
    interrupt_at(monkeypatch, "e", 8)
    with pytest.raises(Interrupt):
        go(plan(path, 3, False))
    monkeypatch.undo()
    sae, rec = go(plan(path, 3, True))
    assert rec.steps == rec_ref.steps == 12
    assert states_equal(sae, ref)
    assert rec.final_terms == rec_ref.final_terms
    assert sae.downstream is None  # the handle to the model is never kept


def test_a_final_checkpoint_resumes_without_training(store, tmp_path, monkeypatch):
    path = tmp_path / "s.safetensors"
    ref = build("topk")
    trainer.train(Member(ref, "s", 3e-3, ckpt=plan(path, 0, False)), store, BUDGET, seed=3)
    assert read(path)[1]["step"] == 20  # every=0: only the end is saved

    def no_steps(*_a, **_k):
        raise AssertionError("a step ran although training was complete")

    again = build("topk")
    monkeypatch.setattr(again, "loss", no_steps)
    trainer.train(Member(again, "s", 3e-3, ckpt=plan(path, 0, True)), store, BUDGET, seed=3)
    assert states_equal(again, ref)


def test_checkpoint_restores_every_rng_stream(tmp_path):
    sae = build("l1")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    state = TrainState(step=3, fired=torch.zeros(128, dtype=torch.bool), total_steps=10)
    save(tmp_path / "c.safetensors", {"a": 1}, sae, opt, state)
    want = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    load(
        tmp_path / "c.safetensors",
        {"a": 1},
        build("l1"),
        torch.optim.Adam(build("l1").parameters()),
    )
    got = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)])
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


def test_cuda_rng_states_of_absent_gpus_are_skipped_on_resume(monkeypatch):
    """A checkpoint written with 2 GPUs visible resumes where only 1 is."""
    from dictbench.train import checkpoint as ckpt_mod

    restored: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, i: restored.append(i))
    tensors, meta = ckpt_mod._capture_rng("cpu")
    tensors["rng/cuda/0"] = torch.zeros(16, dtype=torch.uint8)
    tensors["rng/cuda/1"] = torch.zeros(16, dtype=torch.uint8)
    ckpt_mod._restore_rng(tensors, meta)
    assert restored == [0]


def test_optimizer_moments_round_trip_exactly(tmp_path):
    sae = build("l1")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3, betas=(0.5, 0.9))
    for _ in range(3):
        sae.loss(torch.randn(32, D), 0).total.backward()
        opt.step()
        opt.zero_grad()
    save(
        tmp_path / "c.safetensors",
        {},
        sae,
        opt,
        TrainState(3, torch.zeros(128, dtype=torch.bool), total_steps=10),
    )
    sae2 = build("l1", seed=1)
    opt2 = torch.optim.Adam(sae2.parameters(), lr=1e-3, betas=(0.5, 0.9))
    load(tmp_path / "c.safetensors", {}, sae2, opt2)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][i][k], b["state"][i][k]), (i, k)
    assert states_equal(sae, sae2)
    # Moments come back in their parameter's layout (W_enc is transposed in memory), which
    # Adam's fused kernel needs: it pairs parameter and moment elements by memory offset.
    assert sae2.W_enc.stride() != sae2.W_enc.contiguous().stride()
    for p in sae2.parameters():
        for k in ("exp_avg", "exp_avg_sq"):
            assert opt2.state[p][k].stride() == p.stride(), k


# --- damaged or foreign checkpoints are refused, and training starts over -----------------


@pytest.fixture
def saved(store, tmp_path):
    path = tmp_path / "s.safetensors"
    trainer.train(
        Member(build("topk"), "s", 3e-3, ckpt=plan(path, 0, False)), store, BUDGET, seed=3
    )
    return path


def _flip_last_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x55
    p.write_bytes(bytes(data))


def _edit_header(p: Path) -> None:
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = json.loads(header["__metadata__"]["dictbench_checkpoint"])
    meta["step"] = 3  # a plausible lie: resuming from it would silently skip steps
    header["__metadata__"]["dictbench_checkpoint"] = json.dumps(meta)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


DAMAGE = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "flipped byte in the tensor data": _flip_last_byte,
    "edited step in the header": _edit_header,
    "empty file": lambda p: p.write_bytes(b""),
    "not safetensors": lambda p: p.write_text("hello"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_refused_and_training_starts_over(damage, saved, store):
    DAMAGE[damage](saved)
    with pytest.raises(CheckpointError):
        read(saved)
    log: list[str] = []
    ref = build("topk")
    trainer.train(Member(ref, "s", 3e-3), store, BUDGET, seed=3)
    again = build("topk")
    trainer.train(Member(again, "s", 3e-3, ckpt=plan(saved, 0, True, log)), store, BUDGET, seed=3)
    assert len(log) == 1 and log[0].startswith(f"s: checkpoint {saved} not used: ")
    assert log[0].endswith("; training from step 0")
    assert states_equal(again, ref)  # regenerated: the same result as a clean run


def test_checkpoint_for_other_training_is_refused_untouched(saved):
    sae = build("topk")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    identity = {**read(saved)[1]["identity"], "test": "other"}
    with pytest.raises(CheckpointError, match=r"different training \(test: 'identity' in the"):
        load(saved, identity, sae, opt)
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items())
    assert opt.state_dict()["state"] == {}


def test_checkpoint_with_other_shapes_is_refused_untouched(saved):
    sae = build("topk", d_sae=64)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    identity = read(saved)[1]["identity"]  # right identity, wrong dictionary size
    with pytest.raises(CheckpointError, match="SAE tensor"):
        load(saved, identity, sae, torch.optim.Adam(sae.parameters()))
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items())


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_a_pickle_named_as_a_checkpoint_is_never_unpickled(tmp_path, store):
    _Payload.marker = str(tmp_path / "pwned")
    path = tmp_path / "s.safetensors"
    path.write_bytes(pickle.dumps({"model": _Payload()}))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read(path)
    torch.save({"model": _Payload()}, path)  # torch's zip format, same verdict
    log: list[str] = []
    trainer.train(
        Member(build("l1"), "s", 3e-3, ckpt=plan(path, 0, True, log)), store, BUDGET, seed=3
    )
    assert "not used" in log[0]
    assert not (tmp_path / "pwned").exists()
