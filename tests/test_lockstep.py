"""Lockstep training on one stream of batches (bench/train/lockstep.py,
bench/train/batch_stream.py): each SAE gets exactly the batches it would get alone, the stream
equals the cache, the shuffle buffer is a per-block permutation, and a NaN in one SAE leaves the
others alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dictbench.data.cache import EntryRequest, from_float32, harvest, prepare, to_float32
from dictbench.data.corpus import CorpusSpec, keep_positions
from dictbench.registry import get_baseline
from dictbench.spec import BudgetSpec
from dictbench.train import trainer
from dictbench.train.batch_stream import (
    CacheWindows,
    ModelWindows,
    ShuffleBuffer,
    block_windows_for,
    chunked_mean,
)
from dictbench.train.lockstep import Member, train_group

HOOK = "resid_post.1"
BUDGET = BudgetSpec(train_tokens=960, batch_size=64, d_sae=32, lr_warmup_frac=0.1)


@pytest.fixture
def corpus(tiny_corpus_dir) -> CorpusSpec:
    return CorpusSpec(
        name="local",
        data_files=[str(tiny_corpus_dir / "*.txt")],
        format="text",
        ctx_len=16,
        eval_fraction=0.3,
    )


@pytest.fixture
def store(tiny_llama, corpus, tmp_path):
    return harvest(
        tiny_llama, HOOK, EntryRequest(corpus, "train", 1200, 0), tmp_path / "c", log=lambda m: None
    )


def _build(method: str, d_in: int, seed: int = 0, **params):
    cls = get_baseline(method)
    torch.manual_seed(seed)
    return cls(cls.config_class(d_in=d_in, d_sae=BUDGET.d_sae, **params))


def _buffer(store, budget=BUDGET, seed=0):
    keep = store.keep
    block = block_windows_for(budget.buffer_tokens, int(keep.sum()), store.acts.shape[0])
    return ShuffleBuffer(CacheWindows(store), keep, block, seed)


def _weights(sae) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sae.state_dict().items()}


METHODS = [("l1", {}), ("topk", {"k": 4}), ("gated", {}), ("jumprelu", {})]


def test_lockstep_gives_every_sae_the_weights_it_gets_alone(store):
    d = store.acts.shape[-1]
    alone = {}
    for method, params in METHODS:
        sae = _build(method, d, **params)
        trainer.train(Member(sae, method, 3e-3), store, BUDGET, seed=0)
        alone[method] = _weights(sae)
    members = [Member(_build(m, d, **p), m, 3e-3) for m, p in METHODS]
    out = train_group(members, _buffer(store), BUDGET, sequence_mode=False)
    for m in members:
        assert isinstance(out[m.sae_id], trainer.TrainRecord)
        got = _weights(m.sae)
        for k, v in alone[m.sae_id].items():
            assert torch.equal(got[k], v), (m.sae_id, k)


def test_a_nan_in_one_sae_leaves_the_others_identical(store):
    d = store.acts.shape[-1]
    clean = [Member(_build("l1", d), "a", 3e-3), Member(_build("topk", d, k=4), "b", 3e-3)]
    train_group(clean, _buffer(store), BUDGET, sequence_mode=False)
    poisoned = _build("l1", d, l1_coefficient=1.0)
    original_loss = poisoned.loss

    def loss(batch, step):
        out = original_loss(batch, step)
        return dataclasses.replace(out, total=out.total * float("nan")) if step == 5 else out

    poisoned.loss = loss
    members = [
        Member(_build("l1", d), "a", 3e-3),
        Member(poisoned, "bad", 3e-3),
        Member(_build("topk", d, k=4), "b", 3e-3),
    ]
    out = train_group(members, _buffer(store), BUDGET, sequence_mode=False)
    assert isinstance(out["bad"], trainer.TrainingFailed) and out["bad"].step == 5
    for ref, m in zip(clean, [members[0], members[2]], strict=True):
        assert isinstance(out[m.sae_id], trainer.TrainRecord)
        for k, v in _weights(ref.sae).items():
            assert torch.equal(_weights(m.sae)[k], v)


def test_one_block_is_the_global_permutation_of_the_first_version(store):
    buf = _buffer(store)
    assert buf.n_blocks == 1
    ctx = store.acts.shape[1]
    keep = np.flatnonzero(store.keep)
    flat = (np.arange(store.acts.shape[0])[:, None] * ctx + keep[None, :]).reshape(-1)
    order = flat[np.random.default_rng([0, 17]).permutation(len(flat))]
    rows = np.asarray(store.acts).reshape(-1, store.acts.shape[-1])[order[:100]]
    assert torch.equal(buf.tokens(0, 100), torch.from_numpy(rows))


def _labelled_store(tmp_path, n_windows=70, ctx=16, d=3):
    """A store whose every activation row says where it came from: row[0] = flat index."""
    from dictbench.data.cache import ActivationStore

    acts = np.zeros((n_windows, ctx, d), np.float32)
    acts[..., 0] = np.arange(n_windows * ctx, dtype=np.float32).reshape(n_windows, ctx)
    tokens = np.zeros((n_windows, ctx), np.int32)
    return ActivationStore(tmp_path, acts, tokens, np.zeros(d, np.float32), {})


def test_small_buffers_shuffle_within_blocks_and_cover_each_token_once(tmp_path):
    store = _labelled_store(tmp_path)
    kept = int(store.keep.sum())
    budget = dataclasses.replace(BUDGET, buffer_tokens=16 * kept)  # 16 windows a block
    buf = _buffer(store, budget)
    assert buf.block_windows == 16 and buf.n_blocks == 5
    idx = buf.tokens(0, buf.n_tokens).numpy()[:, 0].astype(np.int64)
    ctx = store.acts.shape[1]
    assert sorted(idx.tolist()) == sorted(
        w * ctx + t for w in range(70) for t in range(1, ctx)
    )  # every kept token exactly once, never position 0
    per_block = 16 * kept
    windows = idx // ctx
    for b in range(buf.n_blocks):
        seg = windows[b * per_block : (b + 1) * per_block]
        assert seg.min() >= b * 16 and seg.max() < (b + 1) * 16
    assert not np.array_equal(idx, np.sort(idx))  # and shuffled within them


def test_window_batches_permute_windows_within_blocks(tmp_path):
    store = _labelled_store(tmp_path)
    buf = _buffer(store, dataclasses.replace(BUDGET, buffer_tokens=16 * 15))
    acts, _ = buf.windows(0, 70)
    got = (acts[:, 0, 0] // 16).astype(int)
    assert sorted(got.tolist()) == list(range(70))
    first = buf.windows(0, 5)[0][:, 0, 0] // 16
    assert (first < 16).all() and list(first) == sorted(first)  # block 0, sorted in batch


def test_a_backwards_read_rebuilds_the_same_block(store):
    kept = int(store.keep.sum())
    buf = _buffer(store, dataclasses.replace(BUDGET, buffer_tokens=16 * kept))
    first = buf.tokens(0, 50)
    buf.tokens(buf.n_tokens - 10, buf.n_tokens)  # last block
    assert torch.equal(buf.tokens(0, 50), first)


def test_the_stream_equals_the_cache_when_the_buffer_covers_the_split(
    tiny_llama, corpus, store, tmp_path
):
    pending = prepare(tiny_llama, HOOK, EntryRequest(corpus, "train", 1200, 0), tmp_path / "other")
    keep = keep_positions(16)
    source = ModelWindows(tiny_llama, HOOK, pending.tokens, keep)
    block = block_windows_for(BUDGET.buffer_tokens, int(keep.sum()), source.n_windows)
    streamed = ShuffleBuffer(source, keep, block, 0)
    d = store.acts.shape[-1]
    a = Member(_build("l1", d), "a", 3e-3)
    b = Member(_build("l1", d), "a", 3e-3)
    train_group([a], _buffer(store), BUDGET, sequence_mode=False)
    train_group([b], streamed, BUDGET, sequence_mode=False)
    for k, v in _weights(a.sae).items():
        assert torch.equal(_weights(b.sae)[k], v), k
    assert np.array_equal(chunked_mean(streamed.block(0).acts, keep), store.mean)


def test_e2e_methods_in_lockstep_share_one_clean_pass(tiny_llama, store):
    d = store.acts.shape[-1]
    budget = dataclasses.replace(BUDGET, train_tokens=300)
    alone = []
    for coef in (0.5, 2.0):
        sae = _build("e2e", d, sparsity_coefficient=coef)
        trainer.train(Member(sae, "e", 1e-3), store, budget, 0, subject=tiny_llama, hook=HOOK)
        alone.append(_weights(sae))
    calls = []
    original = trainer.DownstreamHandle.logits

    def counting(self, acts, ids):
        calls.append(1)
        return original(self, acts, ids)

    members = [Member(_build("e2e", d, sparsity_coefficient=c), f"e{c}", 1e-3) for c in (0.5, 2.0)]
    trainer.DownstreamHandle.logits = counting
    try:
        train_group(members, _buffer(store), budget, True, tiny_llama, HOOK)
    finally:
        trainer.DownstreamHandle.logits = original
    steps = budget.train_tokens // ((budget.batch_size // 15) * 15)
    assert len(calls) == steps * 3  # one clean pass and two spliced passes per step
    for ref, m in zip(alone, members, strict=True):
        for k, v in ref.items():
            assert torch.equal(_weights(m.sae)[k], v)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_smaller_cache_dtypes_round_to_nearest_and_widen_exactly(dtype):
    x = np.random.default_rng(0).normal(size=(4, 3, 8)).astype(np.float32) * 10
    stored = from_float32(x, dtype)
    back = to_float32(stored, {"dtype": dtype})
    ref = torch.from_numpy(x).to(getattr(torch, dtype)).float().numpy()
    assert back.dtype == np.float32 and np.array_equal(back, ref)


def test_cache_dtype_is_part_of_the_fingerprint_and_float32_keeps_the_old_one(
    tiny_llama, corpus, tmp_path
):
    root = tmp_path / "c"
    a = prepare(tiny_llama, HOOK, EntryRequest(corpus, "train", 200, 0), root)
    b = prepare(tiny_llama, HOOK, EntryRequest(corpus, "train", 200, 0, "bfloat16"), root)
    assert a.fingerprint != b.fingerprint
    assert "dtype" not in a.ident and b.ident["dtype"] == "bfloat16"
    from dictbench.data.cache import run_harvest

    s16 = run_harvest(tiny_llama, HOOK, b, log=lambda m: None)
    s32 = run_harvest(tiny_llama, HOOK, a, log=lambda m: None)
    assert s16.acts.dtype == np.uint16 and s16.acts.nbytes * 2 == s32.acts.nbytes
    widened = to_float32(np.asarray(s16.acts), s16.meta)
    ref = torch.from_numpy(np.array(s32.acts)).to(torch.bfloat16).float().numpy()
    assert np.array_equal(widened, ref)


@pytest.mark.parametrize("source", ["cache", "stream"])
def test_a_run_trains_from_the_source_it_is_given(tiny_spec_data, tmp_path, source):
    import json

    import yaml

    from dictbench import runner
    from dictbench import spec as specmod

    data = tiny_spec_data
    data["budget"].update(source=source, cache_dtype="bfloat16")
    data["out"] = str(tmp_path / "out")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    out = runner.run(specmod.resolve(str(path)))
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["training_source"] == source
    train = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("train-")]
    if source == "stream":
        assert train == [] and run["caches"]["train"] is None
    else:
        (entry,) = train
        meta = json.loads((entry / "meta.json").read_text())
        assert meta["dtype"] == "bfloat16"
        assert np.load(entry / "acts.npy", mmap_mode="r").dtype == np.uint16
