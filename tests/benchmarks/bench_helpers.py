"""Sizes and the training step the benchmarks share (imported by the bench modules)."""

from __future__ import annotations

from typing import Any

import torch

from dictbench.train.trainer import apply_update, autocast

# The shapes the README's "bar to beat" was measured at: SmolLM2's d_model, 8x latents.
D_IN, D_SAE, BATCH = 576, 4608, 4096

# Firing fraction of the "trained" regime: L0 ~ 64 of 4,608, a trained SAE's sparsity.
TRAINED_DENSITY = 64 / 4608


def set_trained_sparsity(sae: Any, batch: torch.Tensor) -> None:
    """Set each encoder (gate) bias so every latent fires on ~TRAINED_DENSITY of the
    batch's tokens: the regime a training run spends nearly all its steps in, without
    training. Gated's magnitude bias gets the same cut."""
    with torch.no_grad():
        pre = (batch[:2048] - sae.b_dec) @ sae.W_enc
        cut = torch.quantile(pre.float().cpu(), 1 - TRAINED_DENSITY, dim=0).to(pre.device)
        (sae.b_gate if hasattr(sae, "b_gate") else sae.b_enc).copy_(-cut)
        if hasattr(sae, "b_mag"):
            sae.b_mag.copy_(-cut)


def train_step(
    sae: Any, opt: torch.optim.Optimizer, batch: Any, step: int, autocast_dtype: str | None = None
) -> float:
    """One step exactly as dictbench.train.trainer.train's loop body runs it (loss under the
    budget's autocast context, backward, then trainer.apply_update)."""
    device = str(next(sae.parameters()).device)
    with autocast(device, autocast_dtype):
        out = sae.loss(batch, step)
    opt.zero_grad(set_to_none=True)
    out.total.backward()
    apply_update(sae, opt, getattr(getattr(sae, "cfg", None), "grad_clip", None))
    return float(out.total.detach())
