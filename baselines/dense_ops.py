"""Dense kernels that cut a ReLU-family SAE step to the matmuls it needs.

Written with plain autograd, ``(x - b_dec) @ W_enc`` makes the backward compute the
gradient of the centred input, a full [B, d_in] x [d_in, d_sae] matmul, only to sum
it over the batch for ``b_dec``: one of the six dictionary-sized matmuls of an L1
step is wasted. ``centred_encoder`` returns ``(x - b_dec) @ W_enc + b_enc`` with a
backward that gets ``b_dec``'s gradient from the bias gradient instead
(``-W_enc @ sum_b G_b``, a matrix-vector product), and gets ``b_enc``'s gradient from
the same matmul as ``W_enc``'s by appending a column of ones to the input, so the
[B, d_sae] gradient is read once. ``x`` is data: it gets no gradient.

Beside each kernel is its plain formula (``*_reference``), written as a reader would
write it and run by plain autograd: what the kernel must equal, and what runs instead
under autocast. tests/test_kernel_reference.py checks every kernel against it, values
and gradients; tests/test_fast_paths.py checks the methods' steps.
"""

from __future__ import annotations

from typing import Any

import torch


def autocast_on(t: torch.Tensor) -> bool:
    """Whether torch.autocast is on for ``t``'s device. The Functions here and in
    sparse_ops.py assume one dtype from forward to backward, so under autocast (the
    ``budget.autocast`` option) every entry point computes its plain formula instead
    and autograd with autocast's casts does the rest."""
    return torch.is_autocast_enabled(t.device.type)


class _CentredEncoder(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x, b_dec, W_enc, b_enc):  # type: ignore[override]
        xc = x - b_dec if b_dec is not None else x
        ctx.save_for_backward(xc, W_enc)
        ctx.has_b_dec = b_dec is not None
        ctx.has_b_enc = b_enc is not None
        if b_enc is None:
            return xc @ W_enc
        return torch.addmm(b_enc, xc, W_enc)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):  # type: ignore[override]
        xc, W_enc = ctx.saved_tensors
        need_b_dec = ctx.has_b_dec and ctx.needs_input_grad[1]
        need_w = ctx.needs_input_grad[2]
        need_b_enc = ctx.has_b_enc and ctx.needs_input_grad[3]
        grad = grad.contiguous()
        grad_W_enc = grad_b_enc = grad_b_dec = None
        col_sum: torch.Tensor | None = None
        if need_w:
            # [xc | 1]^T G: the last row is sum_b G_b, the bias gradient, for free.
            ones = torch.ones(xc.shape[0], 1, dtype=xc.dtype, device=xc.device)
            both = torch.cat([xc, ones], dim=1).t() @ grad
            grad_W_enc, col_sum = both[:-1], both[-1]
        elif need_b_enc or need_b_dec:
            col_sum = grad.sum(0)
        if need_b_enc:
            grad_b_enc = col_sum
        if need_b_dec:
            grad_b_dec = -(W_enc @ col_sum)
        return None, grad_b_dec, grad_W_enc, grad_b_enc


def centred_encoder(
    x: torch.Tensor,
    b_dec: torch.Tensor | None,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(x - b_dec) @ W_enc + b_enc`` (either bias may be None) without the wasted
    input-gradient matmul; ``x`` is treated as data."""
    if autocast_on(x):
        return centred_encoder_reference(x, b_dec, W_enc, b_enc)
    return _CentredEncoder.apply(x.detach(), b_dec, W_enc, b_enc)


def centred_encoder_reference(
    x: torch.Tensor,
    b_dec: torch.Tensor | None,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain formula of :func:`centred_encoder` (``x`` is data here too)."""
    pre = (x.detach() - b_dec if b_dec is not None else x.detach()) @ W_enc
    return pre if b_enc is None else pre + b_enc


class _Saved:
    """Stand-in for a ctx so _CentredEncoder.backward can serve the Functions below.

    ``needs`` is the needs_input_grad of (x, b_dec, W_enc, b_enc)."""

    def __init__(self, ctx: Any, x, b_dec, W_enc, has_b_dec: bool, needs) -> None:
        xc = x - b_dec if has_b_dec else x
        self.saved_tensors = (xc, W_enc)
        self.has_b_dec = has_b_dec
        self.has_b_enc = True
        self.needs_input_grad = tuple(needs)


class _ReluSAEDense(torch.autograd.Function):
    """x_hat and the (weighted) L1 sum of a ReLU SAE from its already computed latents.

    One Function so the backward can add the penalty's gradient to the decoder's in
    place and apply the ReLU mask in place: autograd would allocate a [B, d_sae] sum
    and a masked copy, two extra passes over the largest tensor of the step."""

    @staticmethod
    def forward(ctx: Any, f, x, b_dec_in, W_enc, b_enc, W_dec, b_dec, w):  # type: ignore[override]
        col_sum = f.sum(0)
        penalty = col_sum.sum() if w is None else col_sum @ w
        ctx.save_for_backward(f, x, b_dec_in, W_enc, W_dec, col_sum, w)
        ctx.has_b_dec_in = b_dec_in is not None
        ctx.has_w = w is not None
        return torch.addmm(b_dec, f, W_dec), penalty

    @staticmethod
    def backward(ctx: Any, g_xhat: torch.Tensor, g_pen: torch.Tensor):  # type: ignore[override]
        f, x, b_dec_in, W_enc, W_dec, col_sum, w = ctx.saved_tensors
        g_xhat = g_xhat.contiguous()
        need = ctx.needs_input_grad
        g_W_dec = f.t() @ g_xhat if need[5] else None
        g_b_dec = g_xhat.sum(0) if need[6] else None
        g_w = g_pen * col_sum if ctx.has_w and need[7] else None
        g_f = g_xhat @ W_dec.t()
        g_f.add_(g_pen * w if ctx.has_w else g_pen)
        torch.ops.aten.threshold_backward.grad_input(g_f, f, 0.0, grad_input=g_f)
        saved = _Saved(ctx, x, b_dec_in, W_enc, ctx.has_b_dec_in, need[1:5])
        _, g_b_dec_in, g_W_enc, g_b_enc = _CentredEncoder.backward(saved, g_f)
        return None, None, g_b_dec_in, g_W_enc, g_b_enc, g_W_dec, g_b_dec, g_w


def relu_sae_dense(
    f: torch.Tensor,
    x: torch.Tensor,
    b_dec_in: torch.Tensor | None,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f W_dec + b_dec, sum_{b,i} f_bi w_i)`` (w None: all ones) for
    ``f = ReLU((x - b_dec_in) W_enc + b_enc)`` already computed under no_grad, with
    every parameter's gradient: the dense step of an L1-family SAE in the matmuls it
    needs (five) plus a few in-place passes."""
    if autocast_on(x):
        return relu_sae_dense_reference(x, b_dec_in, W_enc, b_enc, W_dec, b_dec, w)
    return _ReluSAEDense.apply(f.detach(), x.detach(), b_dec_in, W_enc, b_enc, W_dec, b_dec, w)


def relu_sae_dense_reference(
    x: torch.Tensor,
    b_dec_in: torch.Tensor | None,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor,
    w: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain formula of :func:`relu_sae_dense` (which needs no precomputed f)."""
    f = torch.relu(centred_encoder_reference(x, b_dec_in, W_enc, b_enc))
    col_sum = f.float().sum(0)
    # Elementwise, not ``col_sum @ w``: autocast would run that dot product in bf16.
    return f @ W_dec + b_dec, (col_sum.sum() if w is None else (col_sum * w).sum())


class _GatedDense(torch.autograd.Function):
    """The Gated SAE's dense training terms from its shared pre-activations.

    Autograd through the written-out formula keeps a dozen [B, d_sae] temporaries
    (two pre-activations, masks, products) and recomputes the encoder matmul; here the
    backward keeps only f and ReLU(pi_gate) (their positive entries are the masks:
    f > 0 exactly where the gate is open and pi_mag > 0) and works in place."""

    @staticmethod
    def forward(ctx: Any, shared, x, b_dec, W_enc, b_gate, r_mag, b_mag, W_dec, norms):  # type: ignore[override]
        scale = r_mag.exp()
        gate = (shared + b_gate).relu_()
        f = torch.addcmul(b_mag, shared, scale).relu_()
        f.masked_fill_(gate == 0, 0.0)
        gate_col_sum = gate.sum(0)
        ctx.save_for_backward(shared, x, b_dec, W_enc, scale, W_dec, norms, f, gate, gate_col_sum)
        x_hat = torch.addmm(b_dec, f, W_dec)
        frozen = torch.addmm(b_dec, gate, W_dec)  # the aux term's stop-gradient decoder
        ctx.mark_non_differentiable(f)
        return x_hat, gate_col_sum @ norms, frozen, f

    @staticmethod
    def backward(ctx: Any, g_xhat, g_pen, g_frozen, _g_f):  # type: ignore[override]
        shared, x, b_dec, W_enc, scale, W_dec, norms, f, gate, gate_col_sum = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_xhat = g_xhat.contiguous()
        g_W_dec = f.t() @ g_xhat if need[7] else None
        g_norms = g_pen * gate_col_sum if need[8] else None
        g_mag = g_xhat @ W_dec.t()  # dL/df, then dL/dpi_mag
        torch.ops.aten.threshold_backward.grad_input(g_mag, f, 0.0, grad_input=g_mag)
        g_gate = g_frozen.contiguous() @ W_dec.t()  # dL/dReLU(pi_gate), then dL/dpi_gate
        g_gate.add_(g_pen * norms)
        torch.ops.aten.threshold_backward.grad_input(g_gate, gate, 0.0, grad_input=g_gate)
        g_b_gate = g_gate.sum(0) if need[4] else None
        g_b_mag = g_mag.sum(0) if need[6] else None
        g_r_mag = (g_mag * shared).sum(0) * scale if need[5] else None
        g_shared = g_gate.addcmul_(g_mag, scale)
        saved = _Saved(ctx, x, b_dec, W_enc, True, (False, need[2], need[3], False))
        _, g_b_dec, g_W_enc, _ = _CentredEncoder.backward(saved, g_shared)
        if need[2]:
            g_b_dec = g_b_dec + g_xhat.sum(0)  # the decoder's bias (the aux copy is frozen)
        return None, None, g_b_dec, g_W_enc, g_b_gate, g_r_mag, g_b_mag, g_W_dec, g_norms


def gated_dense(
    shared: torch.Tensor,
    x: torch.Tensor,
    b_dec: torch.Tensor,
    W_enc: torch.Tensor,
    b_gate: torch.Tensor,
    r_mag: torch.Tensor,
    b_mag: torch.Tensor,
    W_dec: torch.Tensor,
    norms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_hat, sum_bi ReLU(pi_gate)_bi norms_i, frozen x_hat of the aux term, f)`` from
    ``shared = (x - b_dec) W_enc`` computed under no_grad, with every gradient of the
    Gated SAE's loss (the aux reconstruction passes none to W_dec or b_dec)."""
    return _GatedDense.apply(
        shared.detach(), x.detach(), b_dec, W_enc, b_gate, r_mag, b_mag, W_dec, norms
    )


def gated_dense_reference(
    shared: torch.Tensor,
    x: torch.Tensor,
    b_dec: torch.Tensor,
    W_enc: torch.Tensor,
    b_gate: torch.Tensor,
    r_mag: torch.Tensor,
    b_mag: torch.Tensor,
    W_dec: torch.Tensor,
    norms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plain formula of :func:`gated_dense` (``shared`` is recomputed with its graph;
    the aux reconstruction goes through a stop-gradient copy of the decoder)."""
    del shared  # the formula recomputes it, with the graph the kernel builds by hand
    pre = centred_encoder_reference(x, b_dec, W_enc)
    gate = torch.relu(pre + b_gate)
    f = (gate > 0).to(pre.dtype) * torch.relu(pre * r_mag.exp() + b_mag)
    penalty = (gate.sum(0) * norms).sum()
    frozen = gate @ W_dec.detach() + b_dec.detach()
    return f @ W_dec + b_dec, penalty, frozen, f.detach()


# Above this fraction of firing (token, latent) pairs the dense matmuls are cheaper than
# the pair-by-pair sparse kernels (measured on a 2-core CPU at d_in 576, d_sae 4608).
SPARSE_MAX_DENSITY = 0.05


# Counting every entry of a [4096, 4608] matrix took ~48 ms (a tenth of a dense step);
# the decision only picks the faster of two exact paths, so a row sample of at least
# this many entries is enough.
DENSITY_SAMPLE = 1 << 20


def relu_path_is_sparse(f: torch.Tensor) -> bool:
    """Whether a step with these latents should take the sparse (firing pairs) path,
    judged on an evenly strided sample of rows when the matrix is large. Never under
    autocast (see :func:`autocast_on`)."""
    if autocast_on(f):
        return False
    stride = max(1, f.numel() // DENSITY_SAMPLE)
    sample = f[::stride] if f.dim() > 1 and stride > 1 else f
    return int(torch.count_nonzero(sample)) <= SPARSE_MAX_DENSITY * sample.numel()
