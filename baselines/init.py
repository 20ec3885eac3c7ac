"""Initialisation helpers shared by several baselines."""

from __future__ import annotations

import torch


def unit_rows(w: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp_min(eps)


def geometric_median(x: torch.Tensor, iters: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm; a robust centre for b_dec that outlier tokens cannot drag."""
    x = x.double()
    y = x.mean(0)
    for _ in range(iters):
        d = (x - y).norm(dim=-1).clamp_min(1e-12)
        w = 1.0 / d
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * (1 + y.norm()):
            y = y_new
            break
        y = y_new
    return y.float()
