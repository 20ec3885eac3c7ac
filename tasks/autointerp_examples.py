"""Example windows for auto-interpretability, taken from the held-out activations.

Each held-out sequence is cut into fixed, non-overlapping windows of consecutive
scored positions (BOS excluded), delphi-style: a window's activation for a latent is
its maximum over the window's tokens. Fixed windows cannot overlap, so no text is
shown twice, and an example set is a choice of window indices, cheap to store and to
seed. Three passes over the SAE: fire counts for every latent (which are alive and
have enough examples), window maxima for the sampled latents only (memory stays
[n_windows, n_sampled] whatever the dictionary size), and token activations for the
few windows each latent shows the judge.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dictbench.tasks.autointerp_config import AutointerpOptions


@dataclass
class Layout:
    """``positions[k]`` are the sequence positions of window k within every sequence."""

    positions: np.ndarray  # [windows_per_seq, window_tokens]
    n_seq: int

    @property
    def per_seq(self) -> int:
        return self.positions.shape[0]

    @property
    def n_windows(self) -> int:
        return self.n_seq * self.per_seq

    @property
    def n_tokens(self) -> int:
        return self.n_windows * self.positions.shape[1]


def make_layout(keep: np.ndarray, n_seq_total: int, window_tokens: int, max_tokens: int | None):
    kept = np.flatnonzero(keep)
    w = max(1, min(window_tokens, len(kept)))
    per_seq = len(kept) // w
    positions = kept[: per_seq * w].reshape(per_seq, w)
    n_seq = n_seq_total
    if max_tokens is not None:
        n_seq = min(n_seq, max(1, -(-int(max_tokens) // (per_seq * w))))
    return Layout(positions, n_seq)


@dataclass
class Selection:
    """Window indices for one latent, each used for one purpose only."""

    explain: list[int]  # top windows, then one from each lower quantile bin
    detect_pos: list[int]  # held out: next-highest, then sampled from the quantile bins
    detect_neg: list[int]  # windows where the latent never fires
    fuzz_wrong: list[int]  # held-out activating windows to be marked at random


def latent_rng(seed: int, latent: int, stream: int) -> np.random.Generator:
    """One generator per (seed, latent, purpose): results do not depend on which other
    latents were sampled or on the order the judge answered in."""
    return np.random.default_rng([seed & 0xFFFFFFFF, latent, stream])


class WindowScanner:
    def __init__(
        self, sae: torch.nn.Module, acts: np.ndarray, layout: Layout, device: str, batch_tokens: int
    ) -> None:
        self.sae, self.acts, self.layout, self.device = sae, acts, layout, device
        self.seqs_per_batch = max(1, batch_tokens // max(1, layout.n_tokens // layout.n_seq))

    def _blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """[seqs * windows, window_tokens, d_sae] latent activations, block by block."""
        pos = self.layout.positions
        for start in range(0, self.layout.n_seq, self.seqs_per_batch):
            stop = min(self.layout.n_seq, start + self.seqs_per_batch)
            x = np.asarray(self.acts[start:stop])[:, pos.reshape(-1)]
            x = torch.from_numpy(np.ascontiguousarray(x.reshape(-1, x.shape[-1])))
            with torch.no_grad():
                f = self.sae.encode(x.to(self.device, torch.float32)).float()
            yield start, f.reshape((stop - start) * pos.shape[0], pos.shape[1], -1)

    def active_window_counts(self) -> np.ndarray:
        counts = None
        for _, f in self._blocks():
            c = (f.amax(dim=1) > 0).sum(0, dtype=torch.int64).cpu()
            counts = c if counts is None else counts + c
        assert counts is not None
        return counts.numpy()

    def window_max(self, latents: Sequence[int]) -> np.ndarray:
        """[n_windows, len(latents)] float32 window maxima for the given latents."""
        idx = torch.as_tensor(list(latents), dtype=torch.long)
        out = np.zeros((self.layout.n_windows, len(idx)), dtype=np.float32)
        for start, f in self._blocks():
            block = f[:, :, idx.to(f.device)].amax(dim=1).cpu().numpy()
            first = start * self.layout.per_seq
            out[first : first + len(block)] = block
        return out

    def token_acts(self, windows: Sequence[int], latent: int) -> np.ndarray:
        """[len(windows), window_tokens] activations of one latent on chosen windows."""
        seq, k = np.divmod(np.asarray(windows, dtype=np.int64), self.layout.per_seq)
        pos = self.layout.positions[k]  # [n, w]
        x = np.asarray(self.acts[seq[:, None], pos])  # [n, w, d]
        x = torch.from_numpy(np.ascontiguousarray(x.reshape(-1, x.shape[-1])))
        with torch.no_grad():
            f = self.sae.encode(x.to(self.device, torch.float32))[:, latent].float()
        return f.cpu().numpy().reshape(pos.shape)

    def token_ids(self, token_ids: np.ndarray, windows: Sequence[int]) -> np.ndarray:
        seq, k = np.divmod(np.asarray(windows, dtype=np.int64), self.layout.per_seq)
        return token_ids[seq[:, None], self.layout.positions[k]]


def select_windows(
    wmax: np.ndarray, rng: np.random.Generator, opts: AutointerpOptions
) -> Selection:
    """``wmax`` [n_windows] is one latent's window maxima; the caller checked that it has
    enough activating and non-activating windows (``opts.needed_active``). How many of
    each kind are taken: ``opts``' ``n_explain_*``, ``n_detect_*`` and ``fuzz_windows``."""
    n_explain_top, n_explain_quantiles = opts.n_explain_top, opts.n_explain_quantiles
    n_detect_top, n_detect_quantile = opts.n_detect_top, opts.n_detect_quantile
    n_detect_random, n_fuzz = opts.n_detect_random, opts.fuzz_windows
    active = np.flatnonzero(wmax > 0)
    order = active[np.lexsort((active, -wmax[active]))]  # by activation, ties by index
    explain = [int(i) for i in order[:n_explain_top]]
    detect_top = [int(i) for i in order[n_explain_top : n_explain_top + n_detect_top]]
    rest = order[n_explain_top + n_detect_top :]
    bins = np.array_split(np.arange(len(rest)), n_explain_quantiles) if n_explain_quantiles else []
    from_bins = [int(rng.choice(b)) for b in bins if len(b)]
    explain += [int(rest[j]) for j in from_bins]
    remaining = np.delete(rest, from_bins)
    held = rng.choice(remaining, n_detect_quantile + n_fuzz, replace=False).tolist()
    inactive = np.flatnonzero(wmax <= 0)
    neg = rng.choice(inactive, n_detect_random, replace=False).tolist()
    return Selection(
        explain=explain,
        detect_pos=detect_top + [int(i) for i in held[:n_detect_quantile]],
        detect_neg=[int(i) for i in neg],
        fuzz_wrong=[int(i) for i in held[n_detect_quantile:]],
    )


def token_strings(tokenizer: object, ids: Sequence[int]) -> list[str]:
    """Each token's text, by decoding growing prefixes: this keeps the spaces that
    SentencePiece-style tokenizers drop when a single token is decoded alone."""
    ids = [int(i) for i in ids]
    out, prev = [], ""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n])  # type: ignore[attr-defined]
        if text.startswith(prev):
            out.append(text[len(prev) :])
        else:  # a multi-token character was completed; fall back to the lone token
            out.append(tokenizer.decode(ids[n - 1 : n]))  # type: ignore[attr-defined]
        prev = text
    return out


MARK_FRAC = 0.01  # tokens below 1% of the window's peak are not marked (SAEBench's rule)


def true_marks(acts: np.ndarray) -> np.ndarray:
    peak = float(acts.max()) if len(acts) else 0.0
    return (acts > 0) & (acts >= MARK_FRAC * peak)


def wrong_marks(acts: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """As many marks as the window would truly get, put on tokens where the latent is
    zero; None when the window has no such token."""
    inactive = np.flatnonzero(acts <= 0)
    if len(inactive) == 0:
        return None
    k = min(max(1, int(true_marks(acts).sum())), len(inactive))
    marks = np.zeros(len(acts), dtype=bool)
    marks[rng.choice(inactive, k, replace=False)] = True
    return marks
