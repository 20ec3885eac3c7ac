"""The blocked float32 counts equal torch's own integer counts exactly."""

from __future__ import annotations

import pytest
import torch

from dictbench.score import indicators
from dictbench.score.indicators import nonzero_per_row, positive_per_column


def _code(rows: int, cols: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows * 7 + cols)
    f = torch.randn(rows, cols, generator=g)
    f[f.abs() < 0.6] = 0.0  # about 45% exact zeros, and negative entries too
    return f.to(dtype)


@pytest.mark.parametrize("rows", [1, 5, 1024, 1025, 2500])
def test_counts_equal_integer_counts(rows: int) -> None:
    f = _code(rows, 37)
    assert torch.equal(nonzero_per_row(f), torch.count_nonzero(f, dim=1))
    assert torch.equal(positive_per_column(f), (f > 0).sum(0))


def test_small_blocks_and_reduced_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(indicators, "ROWS_PER_BLOCK", 3)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        f = _code(11, 9, dtype)
        assert torch.equal(nonzero_per_row(f), torch.count_nonzero(f, dim=1))
        assert torch.equal(positive_per_column(f), (f > 0).sum(0))


def test_hand_counted_example() -> None:
    f = torch.tensor([[0.0, 2.0, -1.0], [0.0, 0.0, 0.0], [3.0, 0.5, 0.0]])
    assert nonzero_per_row(f).tolist() == [2, 0, 2]
    assert positive_per_column(f).tolist() == [1, 2, 0]


def test_no_rows() -> None:
    f = torch.zeros(0, 4)
    assert nonzero_per_row(f).tolist() == []
    assert positive_per_column(f).tolist() == [0, 0, 0, 0]
