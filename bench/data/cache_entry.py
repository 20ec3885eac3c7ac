"""One activation cache entry on disk: its identity, its files and their verification.

An entry is a folder named by a fingerprint of everything that determines its contents
(model, hook point, corpus split, context length, token count, seed, stored dtype).
Opening one checks it against its meta.json (shapes, dtypes, file sizes, fingerprint,
SHA-256 of every file, or of a fixed sample of activation windows for entries over
2 GiB): a damaged entry is ``CacheDamaged`` (rebuilt by the harvest, never used), one
written for another fingerprint is refused. Writing entries is ``dictbench.data.cache``'s job.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dictbench.data.corpus import CorpusSpec, keep_positions
from dictbench.errors import UserError
from dictbench.io import atomic

CACHE_FORMAT = 1
SAMPLE_WINDOWS = 64
IDENT_KEYS = ("format", "model", "hook", "corpus", "part", "ctx_len", "n_windows", "seed")
# Stored element types (budget.cache_dtype). numpy has no bfloat16: its bits are kept as
# uint16 and widened exactly on read. A float32 entry's identity has no dtype key, so
# its fingerprint is the one entries had before the option existed.
CACHE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def stored_dtype(meta: dict[str, Any]) -> str:
    return str(meta.get("dtype", "float32"))


def to_float32(arr: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Stored activations as float32 (exact for every stored dtype)."""
    if stored_dtype(meta) == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32, copy=False)


def from_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """float32 activations in the stored dtype, rounded to nearest (even)."""
    if dtype == "bfloat16":
        t = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.bfloat16)
        return t.view(torch.int16).numpy().view(np.uint16)
    return arr.astype(CACHE_DTYPES[dtype], copy=False)


class CacheDamaged(ValueError):
    """An entry whose files do not match what its meta.json promises; rebuilt, never used."""


def _ident_digest(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def acts_sha256(acts: np.ndarray) -> str:
    """SHA-256 of every activation, read ~64 MB at a time (the array is memory-mapped)."""
    h = hashlib.sha256()
    step = max(1, (64 << 20) // max(1, acts[0].nbytes))  # ~64 MB at a time
    for s in range(0, acts.shape[0], step):
        h.update(np.ascontiguousarray(acts[s : s + step]).data)
    return h.hexdigest()


def acts_sample_sha256(acts: np.ndarray) -> str:
    """SHA-256 of ``SAMPLE_WINDOWS`` evenly spaced windows and their indices: the check
    of entries too large to hash whole on every open."""
    n = acts.shape[0]
    idx = np.unique(np.linspace(0, n - 1, num=min(n, SAMPLE_WINDOWS)).round().astype(np.int64))
    h = hashlib.sha256(idx.tobytes())
    for i in idx:
        h.update(np.ascontiguousarray(acts[i]).tobytes())
    return h.hexdigest()


def default_cache_root() -> Path:
    return Path(os.environ.get("DICTBENCH_CACHE", Path.home() / ".cache" / "dictbench"))


def fingerprint(
    model_fp: str,
    hook: str,
    corpus: CorpusSpec,
    part: str,
    n_windows: int,
    seed: int,
    dtype: str = "float32",
) -> tuple[str, dict[str, Any]]:
    ident: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "model": model_fp,
        "hook": hook,
        "corpus": corpus.identity(),
        "part": part,
        "ctx_len": corpus.ctx_len,
        "n_windows": n_windows,
        "seed": seed,
    }
    if dtype != "float32":
        ident["dtype"] = dtype
    return _ident_digest(ident), ident


@dataclass
class ActivationStore:
    """Read-only view of one cache entry; ``acts`` is memory-mapped, not loaded."""

    path: Path
    acts: np.ndarray  # [n_windows, ctx, d], float32 unless meta says another dtype
    tokens: np.ndarray  # [n_windows, ctx] int32
    mean: np.ndarray  # [d] float32, mean over non-special positions
    meta: dict[str, Any]
    reused: bool = False

    @property
    def keep(self) -> np.ndarray:
        return keep_positions(self.acts.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.acts.shape[0] * self.keep.sum())

    @classmethod
    def open(
        cls,
        path: Path,
        reused: bool = False,
        expect: tuple[str, dict[str, Any]] | None = None,
        checksums: bool = True,
    ) -> ActivationStore:
        """Open and verify an entry. ``CacheDamaged`` if its files are not what meta.json
        promises; ``UserError`` if ``expect`` (fingerprint, identity) names another entry.
        ``checksums=False`` skips re-hashing (for an entry this process just wrote)."""
        meta, expected = _read_meta(path, expect)
        try:
            acts = np.load(path / "acts.npy", mmap_mode="r")
            tokens = np.load(path / "tokens.npy", allow_pickle=False)
            mean = np.load(path / "mean.npy", allow_pickle=False)
        except Exception as e:  # numpy's header parser raises ValueError, SyntaxError, ...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CacheDamaged(f"cannot read its arrays ({type(e).__name__}: {first})") from e
        checks = [
            ("acts.npy", acts.shape == expected and acts.dtype == _np_dtype(meta)),
            ("acts.npy size", os.path.getsize(path / "acts.npy") == acts.offset + acts.nbytes),
            ("tokens.npy", tokens.shape == expected[:2] and tokens.dtype == np.int32),
            ("mean.npy", mean.shape == expected[2:] and mean.dtype == np.float32),
        ]
        sums = meta.get("checksums")  # absent in entries written before checksums existed
        if checksums and isinstance(sums, dict):
            checks += _checksum_checks(path, acts, sums)
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise CacheDamaged(f"{', '.join(bad)} do not match meta.json")
        return cls(path, acts, tokens, mean, meta, reused)


def _read_meta(
    path: Path, expect: tuple[str, dict[str, Any]] | None
) -> tuple[dict[str, Any], tuple[int, int, int]]:
    """meta.json and the acts shape it promises. ``CacheDamaged`` if it is unreadable or
    disagrees with its own fingerprint; ``UserError`` if ``expect`` names another entry."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("meta.json is not a JSON object")
        ident = {k: meta[k] for k in IDENT_KEYS}
        if "dtype" in meta:
            ident["dtype"] = meta["dtype"]
        fp = meta["fingerprint"]
        expected = (int(meta["n_windows"]), int(meta["ctx_len"]), int(meta["d_model"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CacheDamaged(f"meta.json unreadable ({type(e).__name__}: {e})") from e
    if _ident_digest(ident) != fp:
        raise CacheDamaged("meta.json does not match its own fingerprint")
    want = None if expect is None else json.loads(json.dumps(expect[1]))  # tuples -> lists
    if expect is not None and (fp != expect[0] or ident != want):
        changed = sorted(k for k in IDENT_KEYS if ident.get(k) != want.get(k))
        raise UserError(
            f"activation cache {path}: holds fingerprint {fp} (differs in "
            f"{', '.join(changed) or 'fingerprint'}), this run needs {expect[0]}; "
            "remove that folder or set cache_dir elsewhere"
        )
    return meta, expected


def _checksum_checks(path: Path, acts: np.ndarray, sums: dict[str, Any]) -> list[tuple[str, bool]]:
    """(name, matches) for each file's recorded SHA-256; acts in full or sampled."""
    sha = atomic.file_sha256
    checks = [
        ("tokens.npy checksum", sha(path / "tokens.npy") == sums.get("tokens")),
        ("mean.npy checksum", sha(path / "mean.npy") == sums.get("mean")),
    ]
    if "acts" in sums:
        checks.append(("acts.npy checksum", acts_sha256(acts) == sums["acts"]))
    else:
        sample = acts_sample_sha256(acts) == sums.get("acts_sample")
        checks.append(("acts.npy sampled checksum", sample))
    return checks


def _np_dtype(meta: dict[str, Any]) -> Any:
    return np.dtype(CACHE_DTYPES.get(stored_dtype(meta), np.float32))


def discard(entry: Path) -> None:
    """Move a damaged entry out of the way, then delete it (another process may race us)."""
    aside = entry.parent / f".damaged-{entry.name}-{os.getpid()}"
    try:
        os.replace(entry, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)
