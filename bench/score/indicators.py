"""Exact counts of firing latents, cheap on a CPU.

L0 and dead-latent counts reduce a [tokens, d_sae] code to counts. ``count_nonzero``
and sums over boolean masks ran at 95-130 ms for an 8,192 x 4,608 batch on the 2-core
reference machine: a fresh mask is as big as the code, and boolean reductions are slow.
Here each block of rows is compared into one reused float32 buffer and summed as
floats: about 20 ms, and still exact, since a float32 sum of ones is exact below 2^24
and no block row or column holds more than ``ROWS_PER_BLOCK`` or d_sae ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

ROWS_PER_BLOCK = 1024  # a 1,024 x 4,608 float32 buffer (19 MB) stays cache-friendly


def _indicator_blocks(
    f: torch.Tensor, compare: Callable[..., torch.Tensor]
) -> Iterator[torch.Tensor]:
    """``compare(block, 0)`` as 0/1 float32 blocks of rows, all written into one buffer."""
    rows = min(ROWS_PER_BLOCK, f.shape[0])
    buf = torch.empty((rows, f.shape[1]), dtype=torch.float32, device=f.device)
    for start in range(0, f.shape[0], ROWS_PER_BLOCK):
        block = f[start : start + ROWS_PER_BLOCK]
        out = buf[: block.shape[0]]
        compare(block, 0, out=out)
        yield out


def nonzero_per_row(f: torch.Tensor) -> torch.Tensor:
    """How many entries of each row of a 2-D code are nonzero (int64, one per row)."""
    if f.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=f.device)
    return torch.cat([b.sum(1) for b in _indicator_blocks(f, torch.ne)]).long()


def positive_per_column(f: torch.Tensor) -> torch.Tensor:
    """How many entries of each column of a 2-D code are > 0 (int64, one per column)."""
    total = torch.zeros(f.shape[1], dtype=torch.int64, device=f.device)
    for b in _indicator_blocks(f, torch.gt):
        total += b.sum(0).long()
    return total
