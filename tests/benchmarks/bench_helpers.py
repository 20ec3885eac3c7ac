"""Sizes and the training step the benchmarks share (imported by the bench modules)."""

from __future__ import annotations

from typing import Any

import torch

from dictbench.trainer import apply_update, autocast

# The shapes the README's "bar to beat" was measured at: SmolLM2's d_model, 8x latents.
D_IN, D_SAE, BATCH = 576, 4608, 4096


def train_step(
    sae: Any, opt: torch.optim.Optimizer, batch: Any, step: int, autocast_dtype: str | None = None
) -> float:
    """One step exactly as dictbench.trainer.train's loop body runs it (loss under the
    budget's autocast context, backward, then trainer.apply_update)."""
    device = str(next(sae.parameters()).device)
    with autocast(device, autocast_dtype):
        out = sae.loss(batch, step)
    opt.zero_grad(set_to_none=True)
    out.total.backward()
    apply_update(sae, opt, getattr(getattr(sae, "cfg", None), "grad_clip", None))
    return float(out.total.detach())
