"""Sparse encoder-gradient and decoder kernels for SAEs that keep few latents per token.

A TopK-family SAE keeps k of d_sae latents per token, and a trained L1 or Gated SAE
fires a few dozen, yet a dense implementation pays for all d_sae in the decoder's
forward and backward and in the encoder's backward. Here only the selection itself
(one dense ``(x - b_dec) @ W_enc``, needed to know which latents fire) scales with
d_sae; everything after it touches the kept (token, latent) pairs only:

- ``pairs_encoder`` returns the pre-activations at the pairs with a backward that
  forms the encoder gradients from those pairs alone (one CSR matmul, a bincount),
  never a dense [B, d_sae] gradient;
- ``pairs_decode`` is ``z @ W_dec`` for the z holding values at the pairs, through
  ``embedding_bag``; its backward is a sampled matmul at the pairs (the values'
  gradient) and one CSR matmul (``W_dec``'s).

Neither sorts the pairs by token (they come grouped by token); the weight gradients
share one latent-major transpose per ``Pairs``. ``selected_preacts`` and
``sparse_decode`` take the pairs flat (``rows`` non-decreasing, ``cols``). The
results equal the dense formulas up to float rounding: each kernel has its plain
formula beside it (``*_reference``), which tests/test_kernel_reference.py checks it
against, values and gradients (tests/test_sparse_ops.py checks the TopK family's steps).

``relu_sae_terms`` is the one entry point of the L1 family's step (``l1``, ``l1_april``):
it looks at the density once and takes the fused dense kernel or the firing pairs.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from dictbench.baselines.dense_ops import (
    autocast_on,
    centred_encoder_reference,
    relu_path_is_sparse,
    relu_sae_dense,
    relu_sae_dense_reference,
)


def _csr(crow: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, shape: tuple[int, int]):
    # torch warns once per process that CSR support is "beta"; the kernels used here are
    # checked against the dense formulas in tests/test_sparse_ops.py.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, cols, vals, shape, check_invariants=False)


class Pairs:
    """The kept (token, latent) pairs of a [n, d_sae] batch as a CSR pattern (grouped by
    token), with the latent-major transpose built once, on first use, for every weight
    gradient of the step (an argsort of the latent index; no sort by token is needed)."""

    def __init__(self, crow: torch.Tensor, cols: torch.Tensor, d_sae: int):
        self.crow, self.cols, self.n, self.d_sae = crow, cols, crow.numel() - 1, d_sae
        self._t: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def of_nonzeros(cls, z: torch.Tensor) -> tuple[Pairs, torch.Tensor]:
        """The nonzeros of a dense [n, d_sae] matrix, and their values. Through
        ``nonzero``: ``Tensor.to_sparse_csr`` took twice as long on CPU (torch 2.13)."""
        rows, cols = z.nonzero(as_tuple=True)
        crow = torch.zeros(z.shape[0] + 1, dtype=torch.long, device=z.device)
        crow[1:] = torch.cumsum(torch.bincount(rows, minlength=z.shape[0]), 0)
        return cls(crow, cols, z.shape[1]), z[rows, cols]

    def rows(self) -> torch.Tensor:
        tokens = torch.arange(self.n, device=self.cols.device)
        return torch.repeat_interleave(tokens, self.crow.diff())

    def token_major(self, vals: torch.Tensor) -> torch.Tensor:
        return _csr(self.crow, self.cols, vals, (self.n, self.d_sae))

    def latent_major(self, vals: torch.Tensor) -> torch.Tensor:
        """The [d_sae, n] CSR matrix of the pairs with these values."""
        if self._t is None:
            perm = stable_argsort(self.cols)
            crow_t = torch.zeros(self.d_sae + 1, dtype=torch.long, device=self.cols.device)
            crow_t[1:] = torch.cumsum(torch.bincount(self.cols, minlength=self.d_sae), 0)
            self._t = (perm, crow_t, self.rows()[perm])
        perm, crow_t, rows_t = self._t
        return _csr(crow_t, rows_t, vals[perm], (self.d_sae, self.n))


def stable_argsort(idx: torch.Tensor) -> torch.Tensor:
    """Stable argsort of small non-negative integers. On CPU through numpy's radix sort:
    torch 2.13's CPU sort took ~190 ms for 90k int64 values, numpy ~7 ms."""
    if idx.device.type == "cpu":
        return torch.from_numpy(np.argsort(idx.numpy(), kind="stable"))
    return torch.argsort(idx, stable=True)


class _PairsEncoder(torch.autograd.Function):
    """pre[pairs] for pre = (x - b_dec) @ W_enc + b_enc, given its values at the pairs."""

    @staticmethod
    def forward(ctx, pairs, vals, x, b_dec, W_enc, b_enc):  # type: ignore[override]
        ctx.pairs, ctx.has_b_dec = pairs, b_dec is not None
        ctx.save_for_backward(x, b_dec, W_enc)
        return vals.view_as(vals)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, b_dec, W_enc = ctx.saved_tensors
        pairs: Pairs = ctx.pairs
        grad_W_enc = grad_b_dec = grad_b_enc = None
        if ctx.needs_input_grad[4]:
            # dL/dW_enc = (x - b_dec)^T G with G [n, d_sae] holding grad at the pairs.
            xc = x - b_dec if ctx.has_b_dec else x
            grad_W_enc = torch.sparse.mm(pairs.latent_major(grad), xc).t().contiguous()
        col_sum = torch.bincount(pairs.cols, weights=grad, minlength=pairs.d_sae).to(grad.dtype)
        if ctx.needs_input_grad[5]:
            grad_b_enc = col_sum
        if ctx.has_b_dec and ctx.needs_input_grad[3]:
            # pre depends on b_dec through -b_dec @ W_enc: dL/db_dec = -W_enc (sum_b G_b).
            grad_b_dec = -(W_enc @ col_sum)
        return None, None, None, grad_b_dec, grad_W_enc, grad_b_enc


def pairs_encoder(
    pairs: Pairs,
    vals: torch.Tensor,
    x: torch.Tensor,
    b_dec: torch.Tensor | None,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pre-activations ``(x - b_dec) @ W_enc + b_enc`` at the pairs, given as
    ``vals`` (computed without a graph), with gradients to the encoder formed from the
    pairs alone. ``x`` is data; either bias may be None."""
    return _PairsEncoder.apply(pairs, vals.detach(), x.detach(), b_dec, W_enc, b_enc)


def pairs_encoder_reference(
    pairs: Pairs,
    vals: torch.Tensor,
    x: torch.Tensor,
    b_dec: torch.Tensor | None,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain formula of :func:`pairs_encoder`: the whole pre-activation matrix,
    indexed at the pairs (``vals`` is not needed)."""
    del vals
    return centred_encoder_reference(x, b_dec, W_enc, b_enc)[pairs.rows(), pairs.cols]


class _PairsDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pairs, vals, W_dec):  # type: ignore[override]
        ctx.pairs = pairs
        ctx.save_for_backward(vals, W_dec)
        return F.embedding_bag(
            pairs.cols, W_dec, pairs.crow[:-1], mode="sum", per_sample_weights=vals
        )

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        vals, W_dec = ctx.saved_tensors
        pairs: Pairs = ctx.pairs
        grad = grad.contiguous()
        grad_vals = grad_W_dec = None
        if ctx.needs_input_grad[1]:
            # (grad @ W_dec^T) sampled at the pairs: no dense [n, d_sae] product.
            grad_vals = torch.sparse.sampled_addmm(
                pairs.token_major(vals), grad, W_dec.t(), beta=0.0
            ).values()
        if ctx.needs_input_grad[2]:
            grad_W_dec = torch.sparse.mm(pairs.latent_major(vals), grad)
        return None, grad_vals, grad_W_dec


def pairs_decode(pairs: Pairs, vals: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``z @ W_dec`` for the z holding ``vals`` at the pairs, without the zeros."""
    return _PairsDecode.apply(pairs, vals, W_dec)


def pairs_decode_reference(pairs: Pairs, vals: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """The plain formula of :func:`pairs_decode`: the dense z, then ``z @ W_dec``."""
    return sparse_decode_reference(pairs.rows(), pairs.cols, vals, W_dec, pairs.n)


def pairs_of_rows(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, d_sae: int) -> Pairs:
    """Pairs given flat, ``rows`` non-decreasing."""
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=n_rows), 0)
    return Pairs(crow, cols, d_sae)


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
    what the selection looked at); ``x`` is treated as data (no gradient). Under
    autocast, the plain formula (the whole matrix again) indexed at the pairs."""
    if autocast_on(x):
        return selected_preacts_reference(pre, x, b_dec, W_enc, b_enc, rows, cols)
    pairs = pairs_of_rows(rows, cols, x.shape[0], W_enc.shape[1])
    return pairs_encoder(pairs, pre[rows, cols], x, b_dec, W_enc, b_enc)


def selected_preacts_reference(
    pre: torch.Tensor,
    x: torch.Tensor,
    b_dec: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """The plain formula of :func:`selected_preacts` (``pre`` is not needed)."""
    del pre
    return centred_encoder_reference(x, b_dec, W_enc, b_enc)[rows, cols]


def sparse_decode(
    rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor, n_rows: int
) -> torch.Tensor:
    """sum over a row's pairs of vals * W_dec[cols]: ``z @ W_dec`` without the zeros
    (under autocast, through the dense z)."""
    if autocast_on(vals):
        return sparse_decode_reference(rows, cols, vals, W_dec, n_rows)
    return pairs_decode(pairs_of_rows(rows, cols, n_rows, W_dec.shape[0]), vals, W_dec)


def sparse_decode_reference(
    rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor, n_rows: int
) -> torch.Tensor:
    """The plain formula of :func:`sparse_decode`: the dense z, then ``z @ W_dec``."""
    z = vals.new_zeros(n_rows, W_dec.shape[0]).index_put((rows, cols), vals)
    return z @ W_dec


# --- the L1 family's step --------------------------------------------------------------


def relu_sae_terms(
    x: torch.Tensor, sae: torch.nn.Module, centred: bool, weighted: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_hat, penalty, f0)`` of a ReLU SAE's training step, with every gradient:
    f = ReLU((x - b_dec) W_enc + b_enc) (without ``- b_dec`` unless ``centred``),
    x_hat = f W_dec + b_dec, penalty = sum_bi f_bi w_i with w_i = ||W_dec,i|| when
    ``weighted`` (in the graph) and 1 otherwise; f0 is f without a graph.

    The encoder matmul runs once, without a graph; then, by the density of f0, the fused
    dense kernel (:func:`relu_sae_dense`) or the firing pairs only. Plain formula:
    :func:`relu_sae_reference`."""
    b_dec_in = sae.b_dec if centred else None
    with torch.no_grad():  # the one dictionary-sized encoder matmul, looked at first
        f0 = torch.addmm(sae.b_enc, x - sae.b_dec if centred else x, sae.W_enc).relu_()
    # The row norms are part of the graph: the penalty pulls on W_dec's scale too.
    norms = sae.W_dec.norm(dim=-1) if weighted else None
    if not relu_path_is_sparse(f0):
        x_hat, penalty = relu_sae_dense(
            f0, x, b_dec_in, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, norms
        )
        return x_hat, penalty, f0
    # Few latents fire (a trained SAE): decode and backpropagate through those pairs.
    pairs, pre = Pairs.of_nonzeros(f0)
    vals = torch.relu(pairs_encoder(pairs, pre, x, b_dec_in, sae.W_enc, sae.b_enc))
    x_hat = pairs_decode(pairs, vals, sae.W_dec) + sae.b_dec
    penalty = vals.sum() if norms is None else (vals * norms[pairs.cols]).sum()
    return x_hat, penalty, f0


def relu_sae_reference(
    x: torch.Tensor, sae: torch.nn.Module, centred: bool, weighted: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain formula of :func:`relu_sae_terms`."""
    norms = sae.W_dec.norm(dim=-1) if weighted else None
    b_dec_in = sae.b_dec if centred else None
    args = (x, b_dec_in, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, norms)
    x_hat, penalty = relu_sae_dense_reference(*args)
    return x_hat, penalty, torch.relu(centred_encoder_reference(*args[:4])).detach()
