"""The data-parallel pieces of a training step (torchrun, bench/train/distributed.py): averaging
gradients, stopping every rank together, and resuming every rank from rank 0's bytes."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from dictbench.train import checkpoint, distributed
from dictbench.train.checkpoint import CheckpointError, CheckpointPlan
from dictbench.train.trainer import TrainingFailed


def mean_terms(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Logged loss terms of the global batch: the mean over ranks of the shards' per-token
    means (exact for equal shards); the shard's own values in one process."""
    if distributed.group() is None or not terms:
        return {k: float(v) for k, v in terms.items()}
    vals = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
    vals = distributed.sum_across(vals) / distributed.world()
    return dict(zip(terms, vals.tolist(), strict=True))


def average_and_check(
    params: list[torch.Tensor], acts: torch.Tensor, total: torch.Tensor, sae_id: str, step: int
) -> None:
    """Average gradients over ranks and stop every rank at once on non-finite data or loss
    (a rank that stopped alone would leave the others waiting)."""
    bad = torch.stack(
        [(~torch.isfinite(acts).all()).float(), (~torch.isfinite(total.detach())).float()]
    )
    acts_bad, loss_bad = distributed.average_grads(params, bad).tolist()
    if acts_bad:
        raise TrainingFailed(
            f"{sae_id}: non-finite activations in the training batch at step {step}", step
        )
    if loss_bad:
        raise TrainingFailed(f"{sae_id}: non-finite loss at step {step}", step)


def resume_sharded(
    ckpt: CheckpointPlan,
    identity: dict[str, Any],
    sae: Any,
    opt: torch.optim.Optimizer,
    device: str,
    sae_id: str,
    steps: int,
) -> tuple[int, torch.Tensor, dict[str, float], float, bool] | None:
    """``--resume`` in a data-parallel run: rank 0 reads the checkpoint and sends its bytes,
    every rank restores from those bytes, so all continue from one state. None: start
    from step 0."""
    raw = ckpt.path.read_bytes() if distributed.is_main() and ckpt.path.exists() else None
    raw = distributed.broadcast_object(raw)
    if raw is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ckpt.path.name
        path.write_bytes(raw)
        try:
            st = checkpoint.load(path, identity, sae, opt, device)
        except CheckpointError as e:
            ckpt.log(f"{sae_id}: checkpoint {ckpt.path} not used: {e}; training from step 0")
            return None
    ckpt.log(f"{sae_id}: resuming training at step {st.step} of {steps} ({ckpt.path})")
    return st.step, st.fired, st.terms, st.wall_seconds, st.has_latents
