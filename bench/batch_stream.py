"""The one stream of training batches that every SAE of a run steps on.

Training windows are taken in blocks of whole windows (the shuffle buffer,
``budget.buffer_tokens``). A block's kept tokens are permuted with a seeded generator,
and the batches are consecutive slices of the permuted blocks, one after the other.
Why this shape:

- memory is bounded by one block (buffer_tokens x d_model floats), whatever
  ``train_tokens`` is, and reading a block from the cache is one sequential read;
- the batch at step s depends only on (seed, buffer, s): a resumed run rebuilds the
  block it stopped in from the recorded step, and nothing is pickled;
- the cache and the stream give the same batches: a block is the same windows, read
  from the cache or computed by the model in the same chunks as the harvest;
- with one block covering the whole split, the order is the global permutation the
  first version used (so runs that fit in one buffer reproduce earlier results).

Sequence-batch methods (e2e) take whole windows instead: a block's windows are
permuted with another seed and taken ``seqs`` at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dictbench import faults

TOKEN_SALT = 17  # generator salts: tokens and windows are shuffled independently
WINDOW_SALT = 23
HARVEST_CHUNK = 16  # windows per model forward, as the cache harvest runs them


def block_windows_for(buffer_tokens: int, kept_per_window: int, n_windows: int) -> int:
    """Windows per block: the buffer in whole windows, rounded up to whole model chunks
    (so the stream runs the model on exactly the harvest's chunks), at most all of them."""
    w = max(1, buffer_tokens // max(1, kept_per_window))
    w = -(-w // HARVEST_CHUNK) * HARVEST_CHUNK
    return min(w, n_windows)


def block_rng(seed: int, salt: int, block: int) -> np.random.Generator:
    # Block 0 keeps the generator of the first version's global permutation.
    return np.random.default_rng([seed, salt] if block == 0 else [seed, salt, block])


class CacheWindows:
    """Activations of training windows read from a cache entry (any stored dtype)."""

    def __init__(self, store: Any):
        self.store = store
        self.tokens = store.tokens
        self.n_windows, self.ctx, self.d = store.acts.shape

    def read(self, start: int, stop: int) -> np.ndarray:
        from dictbench.cache import to_float32

        return to_float32(np.asarray(self.store.acts[start:stop]), self.store.meta)


class ModelWindows:
    """Activations computed by the subject model on demand: the stream, no disk.

    ``mean_sum`` accumulates the float64 sum of the first block's kept activations in
    the harvest's order, for the mean-ablation baseline."""

    def __init__(self, subject: Any, hook: str, tokens: np.ndarray, keep: np.ndarray):
        self.subject, self.hook, self.tokens, self.keep = subject, hook, tokens, keep
        self.n_windows, self.ctx = tokens.shape
        self.d = int(subject.d_model)
        self.model_seconds = 0.0

    def read(self, start: int, stop: int) -> np.ndarray:
        import time

        out = np.empty((stop - start, self.ctx, self.d), dtype=np.float32)
        bar = tqdm(
            total=(stop - start) * self.ctx,
            desc=f"stream @ {self.hook}",
            unit="tok",
            unit_scale=True,
            mininterval=2.0,
            leave=False,
        )
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(start, stop, HARVEST_CHUNK):
                e = min(stop, s + HARVEST_CHUNK)
                ids = torch.from_numpy(self.tokens[s:e].astype(np.int64))
                out[s - start : e - start] = self.subject.run_to(self.hook, ids).float().cpu()
                bar.update(ids.numel())
                faults.point(f"stream:window={s}")
        bar.close()
        self.model_seconds += time.perf_counter() - t0
        return out


def chunked_mean(acts: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Mean over kept positions, summed in float64 chunk by chunk as the harvest does."""
    total = np.zeros(acts.shape[-1], dtype=np.float64)
    for s in range(0, acts.shape[0], HARVEST_CHUNK):
        total += acts[s : s + HARVEST_CHUNK][:, keep].sum(axis=(0, 1), dtype=np.float64)
    return (total / (acts.shape[0] * keep.sum())).astype(np.float32)


@dataclass
class _Block:
    index: int
    start: int  # first window
    acts: np.ndarray  # [n, ctx, d] float32
    token_perm: np.ndarray | None = None  # flat row indices into acts, permuted
    window_perm: np.ndarray | None = None  # window indices (absolute), permuted


class ShuffleBuffer:
    """Reads training windows block by block and serves rows of the permuted stream.

    Access is meant to be sequential (each step after the last); a jump backwards (a
    resume, or the scale sample at the start) rebuilds the block it needs."""

    def __init__(self, source: Any, keep: np.ndarray, block_windows: int, seed: int):
        self.source, self.keep, self.seed = source, keep, seed
        self.block_windows = block_windows
        self.n_windows = source.n_windows
        self.kept = int(keep.sum())
        self.n_blocks = -(-self.n_windows // block_windows)
        self._block: _Block | None = None
        self.on_block: Callable[[int, np.ndarray], None] | None = None

    @property
    def n_tokens(self) -> int:
        return self.n_windows * self.kept

    def _windows_of(self, b: int) -> tuple[int, int]:
        return b * self.block_windows, min(self.n_windows, (b + 1) * self.block_windows)

    def block(self, b: int) -> _Block:
        if self._block is None or self._block.index != b:
            self._block = None  # free the old block before reading the new one
            start, stop = self._windows_of(b)
            acts = self.source.read(start, stop)
            self._block = _Block(b, start, acts)
            if self.on_block is not None:
                self.on_block(b, acts)
        return self._block

    def _token_perm(self, blk: _Block) -> np.ndarray:
        if blk.token_perm is None:
            n, ctx = blk.acts.shape[:2]
            keep = np.flatnonzero(self.keep)
            flat = (np.arange(n)[:, None] * ctx + keep[None, :]).reshape(-1)
            rng = block_rng(self.seed, TOKEN_SALT, blk.index)
            blk.token_perm = flat[rng.permutation(len(flat))]
        return blk.token_perm

    def _window_perm(self, blk: _Block) -> np.ndarray:
        if blk.window_perm is None:
            n = blk.acts.shape[0]
            perm = block_rng(self.seed, WINDOW_SALT, blk.index).permutation(n)
            blk.window_perm = blk.start + perm
        return blk.window_perm

    def tokens(self, p0: int, p1: int) -> torch.Tensor:
        """Rows [p0, p1) of the permuted token stream, float32 [p1 - p0, d]."""
        per_block = self.block_windows * self.kept
        parts = []
        p = p0
        while p < p1:
            b = p // per_block
            blk = self.block(b)
            perm = self._token_perm(blk)
            lo = p - b * per_block
            hi = min(len(perm), lo + (p1 - p))
            rows = perm[lo:hi]
            order = np.argsort(rows, kind="stable")  # ascending reads, rows put back in place
            flat = blk.acts.reshape(-1, blk.acts.shape[-1])
            out = np.empty((len(rows), flat.shape[1]), dtype=np.float32)
            out[order] = flat[rows[order]]
            parts.append(out)
            p += hi - lo
        return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))

    def windows(self, w0: int, w1: int) -> tuple[np.ndarray, np.ndarray]:
        """Windows [w0, w1) of the permuted window stream, sorted within the batch:
        (acts [n, ctx, d] float32, token ids [n, ctx] int32)."""
        idx_parts, act_parts = [], []
        w = w0
        while w < w1:
            b = w // self.block_windows
            blk = self.block(b)
            perm = self._window_perm(blk)
            lo = w - b * self.block_windows
            hi = min(len(perm), lo + (w1 - w))
            seg = perm[lo:hi]
            idx_parts.append(seg)
            act_parts.append(blk.acts[seg - blk.start])  # copied before the block may go
            w += hi - lo
        idx = np.concatenate(idx_parts)
        order = np.argsort(idx, kind="stable")
        acts = act_parts[0] if len(act_parts) == 1 else np.concatenate(act_parts)
        return np.ascontiguousarray(acts[order]), self.source.tokens[idx[order]]
