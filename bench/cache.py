"""On-disk activation cache: harvest once per fingerprint, memory-map thereafter.

A cache entry is a folder named by a fingerprint of everything that determines its
contents (model, hook point, corpus split, context length, token count, seed). It
is built in a temporary folder and renamed into place only when complete, so a
killed harvest never leaves an entry that looks usable.
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
from tqdm.auto import tqdm

from dictbench import atomic
from dictbench.corpus import CorpusSpec, keep_positions, make_windows

CACHE_FORMAT = 1


def default_cache_root() -> Path:
    return Path(os.environ.get("DICTBENCH_CACHE", Path.home() / ".cache" / "dictbench"))


def fingerprint(
    model_fp: str, hook: str, corpus: CorpusSpec, part: str, n_windows: int, seed: int
) -> tuple[str, dict[str, Any]]:
    ident = {
        "format": CACHE_FORMAT,
        "model": model_fp,
        "hook": hook,
        "corpus": corpus.identity(),
        "part": part,
        "ctx_len": corpus.ctx_len,
        "n_windows": n_windows,
        "seed": seed,
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]
    return digest, ident


@dataclass
class ActivationStore:
    """Read-only view of one cache entry; ``acts`` is memory-mapped, not loaded."""

    path: Path
    acts: np.ndarray  # [n_windows, ctx, d] float32
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
    def open(cls, path: Path, reused: bool = False) -> ActivationStore:
        meta = json.loads((path / "meta.json").read_text())
        acts = np.load(path / "acts.npy", mmap_mode="r")
        tokens = np.load(path / "tokens.npy")
        mean = np.load(path / "mean.npy")
        expected = (meta["n_windows"], meta["ctx_len"], meta["d_model"])
        if acts.shape != expected or acts.dtype != np.float32:
            raise ValueError(f"activation cache {path} has shape {acts.shape}, expected {expected}")
        return cls(path, acts, tokens, mean, meta, reused)


@dataclass
class PendingHarvest:
    """A harvest whose token windows are chosen (so corpus errors surface) but not yet run."""

    final: Path
    fingerprint: str
    ident: dict[str, Any]
    tokens: np.ndarray
    part: str


def prepare(
    subject: Any,
    hook: str,
    corpus: CorpusSpec,
    part: str,
    n_tokens: int,
    seed: int,
    root: Path,
    log: Any = print,
) -> ActivationStore | PendingHarvest:
    """The cached store if one exists, else the windows to harvest.

    Split out from :func:`harvest` so a run can fail on a too-short corpus before it
    writes anything.
    """
    keep = keep_positions(corpus.ctx_len)
    n_windows = -(-n_tokens // int(keep.sum()))
    fp, ident = fingerprint(subject.fingerprint(), hook, corpus, part, n_windows, seed)
    final = root / f"{part}-{fp}"
    if (final / "meta.json").exists():
        log(f"activation cache: reusing {part} activations at {final} (fingerprint {fp})")
        return ActivationStore.open(final, reused=True)
    tokens = make_windows(subject.tokenizer, corpus, part, n_windows, seed)
    return PendingHarvest(final, fp, ident, tokens, part)


def run_harvest(
    subject: Any,
    hook: str,
    pending: ActivationStore | PendingHarvest,
    batch_windows: int = 16,
    log: Any = print,
) -> ActivationStore:
    if isinstance(pending, ActivationStore):
        return pending
    tokens, part, final, fp = pending.tokens, pending.part, pending.final, pending.fingerprint
    n_windows, ctx = tokens.shape
    keep = keep_positions(ctx)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{part}-{fp}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    d = subject.d_model
    acts = np.lib.format.open_memmap(
        tmp / "acts.npy", mode="w+", dtype=np.float32, shape=(n_windows, ctx, d)
    )
    total = np.zeros(d, dtype=np.float64)
    bar = tqdm(
        total=n_windows * ctx,
        desc=f"harvest {part} @ {hook}",
        unit="tok",
        unit_scale=True,
        mininterval=2.0,
    )
    with torch.inference_mode():
        for start in range(0, n_windows, batch_windows):
            ids = torch.from_numpy(tokens[start : start + batch_windows].astype(np.int64))
            out = subject.run_to(hook, ids).float().cpu().numpy()
            acts[start : start + len(ids)] = out
            total += out[:, keep].sum(axis=(0, 1), dtype=np.float64)
            bar.update(ids.numel())
    bar.close()
    acts.flush()
    del acts
    np.save(tmp / "tokens.npy", tokens)
    np.save(tmp / "mean.npy", (total / (n_windows * keep.sum())).astype(np.float32))
    for name in ("acts.npy", "tokens.npy", "mean.npy"):
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    meta = {
        **pending.ident,
        "fingerprint": fp,
        "d_model": d,
        "n_tokens": int(n_windows * keep.sum()),
    }
    atomic.write_json(tmp / "meta.json", meta)
    if final.exists():  # a concurrent harvest finished first; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
        atomic.fsync_dir(root)
    log(f"activation cache: harvested {part} activations into {final} (fingerprint {fp})")
    return ActivationStore.open(final)


def harvest(
    subject: Any,
    hook: str,
    corpus: CorpusSpec,
    part: str,
    n_tokens: int,
    seed: int,
    root: Path,
    batch_windows: int = 16,
    log: Any = print,
) -> ActivationStore:
    pending = prepare(subject, hook, corpus, part, n_tokens, seed, root, log)
    return run_harvest(subject, hook, pending, batch_windows, log)
