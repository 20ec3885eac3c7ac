"""Sparse encoder-gradient and decoder kernels for SAEs that keep few latents per token.

A TopK-family SAE keeps k of d_sae latents per token, yet a dense implementation
pays for all d_sae in the decoder's forward and backward and in the encoder's
backward. Here only the selection itself (one dense ``(x - b_dec) @ W_enc``, needed
to find the top k) scales with d_sae; everything after it touches the kept
(token, latent) pairs only:

- ``selected_preacts`` returns the pre-activations of the kept pairs with a backward
  that forms the encoder gradients from those pairs alone (a sparse matmul, an
  index_add), never a dense [B, d_sae] gradient;
- ``sparse_decode`` is ``z @ W_dec`` for a z given as (rows, cols, values), through
  ``embedding_bag``, whose backward is an index_add into ``W_dec``'s gradient.

The pairs are given flat: ``rows`` (token index, non-decreasing), ``cols`` (latent
index) and, for decoding, their values. The results equal the dense formulas up to
float rounding; tests/test_sparse_ops.py checks values and gradients against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SelectedPreacts(torch.autograd.Function):
    """pre[rows, cols] for pre = (x - b_dec) @ W_enc + b_enc, given the dense pre."""

    @staticmethod
    def forward(ctx, pre, x, b_dec, W_enc, b_enc, rows, cols):  # type: ignore[override]
        ctx.save_for_backward(x, b_dec, W_enc, rows, cols)
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, b_dec, W_enc, rows, cols = ctx.saved_tensors
        d_in, d_sae = W_enc.shape
        grad_b_enc = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device)
        grad_b_enc.index_add_(0, cols, grad)
        grad_W_enc = grad_b_dec = None
        if ctx.needs_input_grad[3]:
            # dL/dW_enc = (x - b_dec)^T G with G [B, d_sae] holding grad at the kept
            # pairs: computed as (G^T (x - b_dec))^T with a sparse G^T.
            g_t = torch.sparse_coo_tensor(
                torch.stack([cols, rows]), grad, (d_sae, x.shape[0]), check_invariants=False
            ).coalesce()
            grad_W_enc = torch.sparse.mm(g_t, x - b_dec).t()
        if ctx.needs_input_grad[2]:
            # pre depends on b_dec through -b_dec @ W_enc: dL/db_dec = -W_enc (sum_b G_b).
            grad_b_dec = -(W_enc @ grad_b_enc)
        return None, None, grad_b_dec, grad_W_enc, grad_b_enc, None, None


def selected_preacts(
    pre: torch.Tensor,
    x: torch.Tensor,
    b_dec: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """The kept pre-activations with gradients to (b_dec, W_enc, b_enc).

    ``pre`` must be ``(x - b_dec) @ W_enc + b_enc`` computed without a graph (it is
    what the selection looked at); ``x`` is treated as data (no gradient)."""
    return _SelectedPreacts.apply(pre.detach(), x.detach(), b_dec, W_enc, b_enc, rows, cols)


def row_offsets(rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Start of each row's pairs in the flat arrays (rows must be non-decreasing)."""
    counts = torch.bincount(rows, minlength=n_rows)
    return torch.cumsum(counts, 0) - counts


def sparse_decode(
    rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor, n_rows: int
) -> torch.Tensor:
    """sum over a row's pairs of vals * W_dec[cols]: ``z @ W_dec`` without the zeros."""
    return F.embedding_bag(
        cols, W_dec, row_offsets(rows, n_rows), mode="sum", per_sample_weights=vals
    )


def dense_latents(
    rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n_rows: int, d_sae: int
) -> torch.Tensor:
    """The [n_rows, d_sae] latent matrix the pairs describe (no graph), for bookkeeping."""
    z = torch.zeros(n_rows, d_sae, dtype=vals.dtype, device=vals.device)
    z[rows, cols] = vals.detach()
    return z
