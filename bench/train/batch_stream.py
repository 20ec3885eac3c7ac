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

Under torchrun data parallel in stream mode, each block's model chunks (the harvest's
chunks of 16 windows) are split into one contiguous range per rank; each rank runs the
model over its range only, then every rank broadcasts its range to the others
(``distributed.share_rows``), so each rank holds the whole block and cuts its slice of
every global batch from it as before. Why this design:

- the global batch and its order stay exactly those of one process: the chunks are the
  same, so the activations are bit-identical to one process's and to the cache;
- forwarding only the windows whose tokens land in a rank's slices would save nothing
  for token batches: the token shuffle spreads a rank's rows over almost every window
  of the block (a window has ctx_len - 1 kept tokens; with two ranks, the chance that
  none of them falls in one rank's half is about 2^-(ctx_len - 1)); for whole-window
  batches it would forward windows in chunks other than the harvest's, and a batched
  forward is not guaranteed to give the same bits for a window in another batch;
- an exchange of only the rows each rank trains on would move W times less (a rank
  receives about (W-1)/W^2 of a block instead of (W-1)/W), but every reader of the
  stream (the scale and initialisation samples, the first block's mean, resumed runs,
  window batches) would have to declare its rows in advance; sharing the block keeps
  them all unchanged. Each rank receives (W-1)/W of every block (a block is
  buffer_tokens x d_model x 4 bytes: 1.6 GB for 2^19 tokens of a 768-wide model), over
  gloo in host memory, where it saves the forward of (W-1)/W of the block's tokens;
- every rank reads the blocks in the same order at the same step: a batch reader names
  the global batch it is part of (``within``), and every block that batch touches is
  read by every rank, even one whose own slice lies in the block before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dictbench import faults
from dictbench.train import distributed

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
        from dictbench.data.cache import to_float32

        return to_float32(np.asarray(self.store.acts[start:stop]), self.store.meta)


class ModelWindows:
    """Activations computed by the subject model on demand: the stream, no disk.

    With ``ranks_share`` under torchrun, each rank forwards its share of every read's
    chunks and the ranks exchange them (module docstring): every rank must then make the
    same reads at the same point, as ``ShuffleBuffer`` does for the training batches.
    ``windows_forwarded`` counts the windows this process ran the model on."""

    def __init__(
        self,
        subject: Any,
        hook: str,
        tokens: np.ndarray,
        keep: np.ndarray,
        ranks_share: bool = False,
    ):
        self.subject, self.hook, self.tokens, self.keep = subject, hook, tokens, keep
        self.n_windows, self.ctx = tokens.shape
        self.d = int(subject.d_model)
        self.ranks_share = ranks_share
        self.model_seconds = 0.0
        self.windows_forwarded = 0

    def shares(self, start: int, stop: int) -> list[tuple[int, int]] | None:
        """Each rank's windows of a read of [start, stop): whole harvest chunks, one
        contiguous range per rank; None when this process reads it all alone."""
        if not self.ranks_share or distributed.world() == 1:
            return None
        n_chunks = -(-(stop - start) // HARVEST_CHUNK)
        return [
            (min(stop, start + a * HARVEST_CHUNK), min(stop, start + b * HARVEST_CHUNK))
            for a, b in distributed.split_evenly(n_chunks, distributed.world())
        ]

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.ctx, self.d), dtype=np.float32)
        shares = self.shares(start, stop)
        lo, hi = (start, stop) if shares is None else shares[distributed.rank()]
        self._forward(out[lo - start : hi - start], lo, hi)
        if shares is not None:
            distributed.share_rows(
                torch.from_numpy(out), [(a - start, b - start) for a, b in shares]
            )
        return out

    def _forward(self, out: np.ndarray, start: int, stop: int) -> None:
        """The model's activations of windows [start, stop) into ``out``, in the harvest's
        chunks (``start`` is on a chunk boundary of the split)."""
        bar = tqdm(
            total=(stop - start) * self.ctx,
            desc=f"stream @ {self.hook}",
            unit="tok",
            unit_scale=True,
            mininterval=2.0,
            leave=False,
            **({} if distributed.is_main() else {"disable": True}),  # one bar per run
        )
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(start, stop, HARVEST_CHUNK):
                e = min(stop, s + HARVEST_CHUNK)
                ids = torch.from_numpy(self.tokens[s:e].astype(np.int64))
                out[s - start : e - start] = self.subject.run_to(self.hook, ids).float().cpu()
                self.windows_forwarded += e - s
                bar.update(ids.numel())
                faults.point(f"stream:window={s}")
        bar.close()
        self.model_seconds += time.perf_counter() - t0


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

    def _spans(self, span: tuple[int, int], per_window: int) -> list[tuple[int, int, int]]:
        """(block, start, stop) of each block's part of stream positions [start, stop),
        in order; ``per_window`` positions per window (kept tokens, or 1 for windows)."""
        per_block = self.block_windows * per_window
        out = []
        p, end = span
        while p < end:
            b = p // per_block
            w_start, w_stop = self._windows_of(b)
            stop = min(end, b * per_block + (w_stop - w_start) * per_window)
            if b >= self.n_blocks or stop <= p:
                total = self.n_windows * per_window
                raise IndexError(f"stream position {p} is past the end of the stream ({total})")
            out.append((b, p, stop))
            p = stop
        return out

    def tokens(self, p0: int, p1: int, within: tuple[int, int] | None = None) -> torch.Tensor:
        """Rows [p0, p1) of the permuted token stream, float32 [p1 - p0, d].

        ``within``: the global batch these rows are a rank's slice of. Every block it
        touches is read, in order, even where this slice needs nothing from it: a stream
        the ranks share must be read by all of them together (module docstring)."""
        parts = []
        for b, a, c in self._spans(within or (p0, p1), self.kept):
            lo, hi = max(a, p0), min(c, p1)
            if lo < hi:
                parts.append(self._token_rows(b, lo, hi))
            else:
                self.block(b)
        if not parts:
            return torch.empty((0, self.source.d), dtype=torch.float32)
        return torch.from_numpy(parts[0] if len(parts) == 1 else np.concatenate(parts))

    def _token_rows(self, b: int, p0: int, p1: int) -> np.ndarray:
        # Its own frame, so the block is no longer referenced when the next one is read.
        blk = self.block(b)
        base = b * self.block_windows * self.kept
        rows = self._token_perm(blk)[p0 - base : p1 - base]
        order = np.argsort(rows, kind="stable")  # ascending reads, rows put back in place
        flat = blk.acts.reshape(-1, blk.acts.shape[-1])
        out = np.empty((len(rows), flat.shape[1]), dtype=np.float32)
        out[order] = flat[rows[order]]
        return out

    def windows(
        self, w0: int, w1: int, within: tuple[int, int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Windows [w0, w1) of the permuted window stream, sorted within the batch:
        (acts [n, ctx, d] float32, token ids [n, ctx] int32). ``within`` as for tokens."""
        idx_parts, act_parts = [], []
        for b, a, c in self._spans(within or (w0, w1), 1):
            lo, hi = max(a, w0), min(c, w1)
            if lo < hi:
                seg, acts = self._window_rows(b, lo, hi)
                idx_parts.append(seg)
                act_parts.append(acts)
            else:
                self.block(b)
        idx = np.concatenate(idx_parts)
        order = np.argsort(idx, kind="stable")
        acts = act_parts[0] if len(act_parts) == 1 else np.concatenate(act_parts)
        return np.ascontiguousarray(acts[order]), self.source.tokens[idx[order]]

    def _window_rows(self, b: int, w0: int, w1: int) -> tuple[np.ndarray, np.ndarray]:
        blk = self.block(b)
        seg = self._window_perm(blk)[w0 - b * self.block_windows : w1 - b * self.block_windows]
        return seg, blk.acts[seg - blk.start]  # copied before the block may go
