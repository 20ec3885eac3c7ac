"""The data-parallel pieces of a training step (torchrun, bench/train/distributed.py): averaging
gradients, stopping every rank together, and resuming every rank from rank 0's bytes."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from dictbench.train import distributed
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


@contextlib.contextmanager
def rank0_copy(path: Path) -> Iterator[Path | None]:
    """``--resume`` in a data-parallel run: rank 0 reads the checkpoint at ``path`` and
    sends its bytes; every rank gets a local copy of those bytes (None where rank 0 has
    no checkpoint), so all restore from one state. The copy is removed on exit."""
    raw = path.read_bytes() if distributed.is_main() and path.exists() else None
    raw = distributed.broadcast_object(raw)
    if raw is None:
        yield None
        return
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        copy.write_bytes(raw)
        yield copy
