"""Corpus splits and token windows.

The train / eval split is per document (disjoint by construction, seeded); windows
start with BOS and never straddle two documents.
"""

from __future__ import annotations

import numpy as np
import pytest

from dictbench.data.corpus import (
    CorpusSpec,
    in_eval_split,
    iter_split_documents,
    keep_positions,
    make_windows,
)
from dictbench.data.subject import ByteTokenizer
from dictbench.errors import UserError

BOS = ByteTokenizer.bos_token_id


def _split_indices(spec: CorpusSpec, seed: int) -> tuple[list[int], list[int]]:
    train = [i for i, _ in iter_split_documents(spec, "train", seed)]
    evals = [i for i, _ in iter_split_documents(spec, "eval", seed)]
    return train, evals


@pytest.fixture(scope="module")
def sotu_splits() -> dict[int, tuple[list[int], list[int]]]:
    spec = CorpusSpec()  # the embedded corpus, eval_fraction 0.1
    return {seed: _split_indices(spec, seed) for seed in (0, 1)}


def test_sotu_split_is_disjoint_and_covers_every_document(sotu_splits):
    train, evals = sotu_splits[0]
    assert len(train) > 0 and len(evals) > 0
    assert not set(train) & set(evals)
    n_docs = len(train) + len(evals)
    assert sorted(train + evals) == list(range(n_docs))
    # roughly the requested fraction (233 + 16 documents at the time of writing)
    assert 0.02 < len(evals) / n_docs < 0.25


def test_sotu_split_is_deterministic_per_seed(sotu_splits):
    assert _split_indices(CorpusSpec(), 0) == sotu_splits[0]
    assert sotu_splits[0][1] != sotu_splits[1][1]
    assert sotu_splits[1][0] and sotu_splits[1][1]


def test_split_follows_in_eval_split(sotu_splits):
    train, evals = sotu_splits[0]
    assert all(in_eval_split(i, 0, 0.1) for i in evals)
    assert not any(in_eval_split(i, 0, 0.1) for i in train)


def test_in_eval_split_fraction():
    hits = sum(in_eval_split(i, 7, 0.25) for i in range(4000))
    assert 0.22 < hits / 4000 < 0.28
    assert not any(in_eval_split(i, 7, 0.0) for i in range(200))


# --- windows ----------------------------------------------------------------------------

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def letter_corpus(tmp_path_factory) -> CorpusSpec:
    """26 documents; document i is one letter repeated, with lengths that leave remainders."""
    folder = tmp_path_factory.mktemp("letters")
    for i, letter in enumerate(LETTERS):
        (folder / f"doc{i:02d}.txt").write_text(letter * (20 + 3 * i))
    return CorpusSpec(
        name="local",
        data_files=[str(folder / "*.txt")],
        format="text",
        ctx_len=8,
        eval_fraction=0.3,
    )


def _doc_lengths(spec: CorpusSpec, part: str, seed: int) -> list[int]:
    return [len(text) for _, text in iter_split_documents(spec, part, seed)]


@pytest.mark.parametrize("part", ["train", "eval"])
def test_windows_start_with_bos_and_stay_in_one_document(letter_corpus, part):
    spec = letter_corpus
    body = spec.ctx_len - 1
    lengths = _doc_lengths(spec, part, 0)
    assert lengths, f"the {part} split of the letter corpus is empty"
    n_all = sum(n // body for n in lengths)
    windows = make_windows(ByteTokenizer(), spec, part, n_all, seed=0)
    assert windows.shape == (n_all, spec.ctx_len)
    assert windows.dtype == np.int32
    assert (windows[:, 0] == BOS).all()
    rest = windows[:, 1:]
    assert (rest != BOS).all()
    # Every window's body is a single document's letter: no window crosses documents.
    assert (rest == rest[:, :1]).all()
    # Each document contributes exactly floor(len / body) windows.
    letters_in_split = {text[0] for _, text in iter_split_documents(spec, part, 0)}
    counts = {chr(c): int((rest[:, 0] == c).sum()) for c in np.unique(rest[:, 0])}
    assert set(counts) <= letters_in_split
    for _, text in iter_split_documents(spec, part, 0):
        assert counts.get(text[0], 0) == len(text) // body


def test_train_and_eval_windows_come_from_different_documents(letter_corpus):
    spec = letter_corpus
    train_n = sum(n // 7 for n in _doc_lengths(spec, "train", 0))
    eval_n = sum(n // 7 for n in _doc_lengths(spec, "eval", 0))
    train = make_windows(ByteTokenizer(), spec, "train", train_n, seed=0)
    evals = make_windows(ByteTokenizer(), spec, "eval", eval_n, seed=0)
    assert not set(np.unique(train[:, 1:])) & set(np.unique(evals[:, 1:]))


def test_windows_are_a_seeded_sample(letter_corpus):
    tok = ByteTokenizer()
    a = make_windows(tok, letter_corpus, "train", 10, seed=0)
    b = make_windows(tok, letter_corpus, "train", 10, seed=0)
    assert a.shape == (10, 8)
    np.testing.assert_array_equal(a, b)


class _BatchingTokenizer(ByteTokenizer):
    """ByteTokenizer with ``encode_many``, recording each batch's size."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        self.batches.append(len(texts))
        return [self.encode(t) for t in texts]


@pytest.mark.parametrize("streaming", [False, True])
def test_batched_encoding_gives_the_windows_of_one_document_at_a_time(tmp_path, streaming):
    folder = tmp_path / "docs"
    folder.mkdir()
    rng = np.random.default_rng(4)
    for i in range(150):  # three batches of 64, 64 and 22 documents
        (folder / f"d{i:03d}.txt").write_text("".join(rng.choice(list(LETTERS), 9 + i % 13)))
    spec = CorpusSpec(
        name="local", data_files=[str(folder / "*.txt")], format="text", ctx_len=8,
        eval_fraction=0.0, streaming=streaming,
    )  # fmt: skip
    n = 40 if streaming else 150
    batching = _BatchingTokenizer()
    got = make_windows(batching, spec, "train", n, seed=0)
    np.testing.assert_array_equal(got, make_windows(ByteTokenizer(), spec, "train", n, seed=0))
    assert batching.batches == ([64] if streaming else [64, 64, 22])


def test_too_many_windows_says_how_many_tokens(letter_corpus):
    spec = letter_corpus
    lengths = _doc_lengths(spec, "eval", 0)
    n_tokens = sum(lengths)
    n_windows = sum(n // (spec.ctx_len - 1) for n in lengths)
    asked = n_windows + 1
    with pytest.raises(UserError) as err:
        make_windows(ByteTokenizer(), spec, "eval", asked, seed=0)
    msg = str(err.value)
    assert "eval split" in msg
    assert f"{n_tokens} tokens" in msg
    assert f"{asked} windows" in msg
    assert f"{asked * spec.ctx_len} tokens" in msg


def test_missing_local_files_name_the_pattern(tmp_path):
    spec = CorpusSpec(name="local", data_files=[str(tmp_path / "none*.txt")])
    with pytest.raises(UserError, match="corpus.data_files"):
        make_windows(ByteTokenizer(), spec, "train", 1, seed=0)


def test_keep_positions_drops_only_position_zero():
    keep = keep_positions(5)
    assert keep.tolist() == [False, True, True, True, True]
