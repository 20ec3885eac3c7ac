"""Sizes and the training step the benchmarks share (imported by the bench modules)."""

from __future__ import annotations

from typing import Any

import torch

# The shapes the README's "bar to beat" was measured at: SmolLM2's d_model, 8x latents.
D_IN, D_SAE, BATCH = 576, 4608, 4096


def train_step(sae: Any, opt: torch.optim.Optimizer, batch: Any, step: int) -> float:
    """One step exactly as dictbench.trainer.train's loop body runs it (loss, backward,
    the method's gradient hook, optional clip, Adam, the method's constraint hook)."""
    out = sae.loss(batch, step)
    opt.zero_grad(set_to_none=True)
    out.total.backward()
    if hasattr(sae, "before_optimizer_step"):
        sae.before_optimizer_step()
    clip = getattr(getattr(sae, "cfg", None), "grad_clip", None)
    if clip:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)
    opt.step()
    if hasattr(sae, "after_step"):
        sae.after_step()
    return float(out.total.detach())
