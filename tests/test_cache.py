"""Activation cache: one entry per fingerprint, built atomically, reused without recompute."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from dictbench.data.cache import ActivationStore, EntryRequest, fingerprint, harvest
from dictbench.data.corpus import CorpusSpec

HOOK = "resid_post.1"
N_TOKENS = 300  # 20 windows of 15 predicted positions at ctx_len 16


@pytest.fixture
def corpus(tiny_corpus_dir) -> CorpusSpec:
    return CorpusSpec(
        name="local",
        data_files=[str(tiny_corpus_dir / "*.txt")],
        format="text",
        ctx_len=16,
        eval_fraction=0.3,
    )


def _harvest(subject, corpus, root, part="train", hook=HOOK, seed=0, n_tokens=N_TOKENS, log=None):
    lines: list[str] = []
    store = harvest(
        subject,
        hook,
        EntryRequest(corpus, part, n_tokens, seed),
        root,
        batch_windows=8,
        log=log or lines.append,
    )
    return store, lines


def test_harvest_stores_the_subject_activations(tiny_llama, corpus, tmp_path):
    store, lines = _harvest(tiny_llama, corpus, tmp_path / "cache")
    assert not store.reused
    assert store.path.parent == tmp_path / "cache"
    assert store.path.name.startswith("train-")
    assert any("harvested" in line for line in lines)
    n_windows = -(-N_TOKENS // 15)
    assert store.acts.shape == (n_windows, 16, tiny_llama.d_model)
    assert store.acts.dtype == np.float32
    assert store.tokens.shape == (n_windows, 16)
    assert (store.tokens[:, 0] == tiny_llama.tokenizer.bos_token_id).all()
    assert store.n_tokens == n_windows * 15
    with torch.inference_mode():
        expected = tiny_llama.run_to(HOOK, torch.from_numpy(store.tokens.astype(np.int64)))
    np.testing.assert_allclose(np.asarray(store.acts), expected.numpy(), rtol=1e-5, atol=1e-5)
    meta = json.loads((store.path / "meta.json").read_text())
    assert meta["fingerprint"] == store.path.name.split("-", 1)[1]
    assert meta["hook"] == HOOK and meta["ctx_len"] == 16 and meta["part"] == "train"


def test_stored_mean_is_the_float64_mean_of_non_special_positions(tiny_llama, corpus, tmp_path):
    store, _ = _harvest(tiny_llama, corpus, tmp_path / "cache")
    acts = np.asarray(store.acts, dtype=np.float64)
    expected = acts[:, 1:].mean(axis=(0, 1))
    assert store.mean.shape == (tiny_llama.d_model,)
    np.testing.assert_allclose(store.mean, expected, rtol=1e-6, atol=1e-7)
    # position 0 (BOS) is excluded: including it would give a different vector
    assert not np.allclose(acts.mean(axis=(0, 1)), expected, rtol=1e-6, atol=1e-7)


def test_second_harvest_reuses_without_recomputing(tiny_llama, corpus, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    first, _ = _harvest(tiny_llama, corpus, root)

    def no_forward(*_a, **_k):
        raise AssertionError("run_to called although the cache entry exists")

    monkeypatch.setattr(tiny_llama, "run_to", no_forward)
    second, lines = _harvest(tiny_llama, corpus, root)
    assert second.reused
    assert second.path == first.path
    assert len(lines) == 1 and "reusing" in lines[0] and str(first.path) in lines[0]
    np.testing.assert_array_equal(np.asarray(second.acts), np.asarray(first.acts))
    np.testing.assert_array_equal(second.tokens, first.tokens)
    # and the eval split is a separate entry that still needs computing
    with pytest.raises(AssertionError, match="run_to called"):
        _harvest(tiny_llama, corpus, root, part="eval")


def test_harvest_is_deterministic_across_cache_roots(tiny_llama, corpus, tmp_path):
    a, _ = _harvest(tiny_llama, corpus, tmp_path / "a", part="eval")
    b, _ = _harvest(tiny_llama, corpus, tmp_path / "b", part="eval")
    assert a.path.name == b.path.name
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(np.asarray(a.acts), np.asarray(b.acts))


def test_fingerprint_changes_with_what_determines_the_contents(corpus):
    base, ident = fingerprint("model-a", HOOK, corpus, "train", 20, 0)
    assert ident["hook"] == HOOK and ident["seed"] == 0 and ident["ctx_len"] == 16
    assert fingerprint("model-a", HOOK, corpus, "train", 20, 0)[0] == base
    variants = {
        "hook": fingerprint("model-a", "resid_post.2", corpus, "train", 20, 0)[0],
        "seed": fingerprint("model-a", HOOK, corpus, "train", 20, 1)[0],
        "ctx": fingerprint(
            "model-a", HOOK, dataclasses.replace(corpus, ctx_len=32), "train", 20, 0
        )[0],
        "model": fingerprint("model-b", HOOK, corpus, "train", 20, 0)[0],
        "part": fingerprint("model-a", HOOK, corpus, "eval", 20, 0)[0],
        "windows": fingerprint("model-a", HOOK, corpus, "train", 21, 0)[0],
        "eval_fraction": fingerprint(
            "model-a", HOOK, dataclasses.replace(corpus, eval_fraction=0.2), "train", 20, 0
        )[0],
    }
    assert base not in variants.values()
    assert len(set(variants.values())) == len(variants)


def test_harvest_with_another_hook_or_seed_is_a_new_entry(tiny_llama, corpus, tmp_path):
    root = tmp_path / "cache"
    base, _ = _harvest(tiny_llama, corpus, root, part="eval")
    other_hook, _ = _harvest(tiny_llama, corpus, root, part="eval", hook="resid_post.0")
    other_seed, _ = _harvest(tiny_llama, corpus, root, part="eval", seed=1)
    assert not other_hook.reused and not other_seed.reused
    assert len({base.path, other_hook.path, other_seed.path}) == 3


def test_leftover_tmp_folder_is_never_an_entry(tiny_llama, corpus, tmp_path):
    root = tmp_path / "cache"
    fp, ident = fingerprint(tiny_llama.fingerprint(), HOOK, corpus, "train", 20, 0)
    # A killed harvest from another process: complete-looking files in a .tmp- folder.
    stale = root / f".tmp-train-{fp}-999999"
    stale.mkdir(parents=True)
    np.save(stale / "tokens.npy", np.zeros((20, 16), dtype=np.int32))
    np.save(stale / "acts.npy", np.full((20, 16, tiny_llama.d_model), 7.0, dtype=np.float32))
    np.save(stale / "mean.npy", np.full(tiny_llama.d_model, 7.0, dtype=np.float32))
    meta = {**ident, "fingerprint": fp, "d_model": tiny_llama.d_model, "n_tokens": 300}
    (stale / "meta.json").write_text(json.dumps(meta))

    store, lines = _harvest(tiny_llama, corpus, root)
    assert not store.reused
    assert store.path == root / f"train-{fp}"
    assert not any("reusing" in line for line in lines)
    assert not np.any(np.asarray(store.acts) == 7.0)
    assert stale.exists()  # left alone: it may belong to a harvest still running


def test_interrupted_harvest_leaves_no_entry(tiny_llama, corpus, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    calls = {"n": 0}
    real_run_to = tiny_llama.run_to

    def dies_on_second_batch(hook, ids):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_run_to(hook, ids)

    monkeypatch.setattr(tiny_llama, "run_to", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _harvest(tiny_llama, corpus, root)
    assert not [p for p in root.iterdir() if not p.name.startswith(".tmp-")]

    monkeypatch.setattr(tiny_llama, "run_to", real_run_to)
    store, lines = _harvest(tiny_llama, corpus, root)
    assert not store.reused
    assert any("harvested" in line for line in lines)
    reopened = ActivationStore.open(store.path)
    assert reopened.acts.shape == store.acts.shape
    # the retry (same process) replaced its own temporary folder instead of piling up
    assert len([p for p in root.iterdir() if p.name.startswith(".tmp-")]) == 0
