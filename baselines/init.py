"""Initialisation helpers shared by several baselines."""

from __future__ import annotations

import torch
from torch import nn


def unit_rows(w: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return w / w.norm(dim=-1, keepdim=True).clamp_min(eps)


def tied_init(d_in: int, d_sae: int, decoder_norm: float = 1.0) -> tuple[nn.Parameter, ...]:
    """``(W_dec, W_enc, b_enc, b_dec)`` of a fresh SAE: decoder rows in random directions
    of norm ``decoder_norm``, the encoder their transpose (so every latent starts out
    reading the direction it writes), zero biases. One ``torch.randn`` draw: a seed
    gives the same weights whichever method asks."""
    w = torch.randn(d_sae, d_in)
    w_dec = decoder_norm * w / w.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return (
        nn.Parameter(w_dec),
        nn.Parameter(w_dec.t().clone()),
        nn.Parameter(torch.zeros(d_sae)),
        nn.Parameter(torch.zeros(d_in)),
    )


def project_out_radial_grad(w: torch.nn.Parameter) -> None:
    """Keep only the gradient tangent to each (unit) row's sphere, so an optimiser step
    turns decoder rows instead of changing their norms (which an L1 penalty would
    otherwise exploit by shrinking f and growing W_dec)."""
    g = w.grad
    if g is not None:
        g.sub_((g * w.data).sum(-1, keepdim=True) * w.data)


@torch.no_grad()
def renormalise_rows_(w: torch.nn.Parameter) -> None:
    """Undo the small norm drift an optimiser step leaves after the projection."""
    w.copy_(unit_rows(w))


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
