"""The training half of `dictbench run`: the planned SAEs that still need training, built
and trained in lockstep groups, then saved with their training records.

A group is every SAE that steps on one stream of batches: the same seed (the seed sets
the token order) and the same batch kind (token batches, or whole windows for e2e
methods). Each group reads the training windows once, from the cache or from the model
(``budget.source``), whatever the number of SAEs in it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dictbench.data.cache import ActivationStore
from dictbench.data.corpus import keep_positions
from dictbench.io import atomic
from dictbench.io.sae_io import WEIGHTS, class_ref, save_sae
from dictbench.score.records import RecordTarget, write_record
from dictbench.spec import STREAM_ABOVE_BYTES, RunSpec
from dictbench.train import checkpoint, distributed
from dictbench.train.batch_stream import (
    CacheWindows,
    ModelWindows,
    ShuffleBuffer,
    block_windows_for,
    chunked_mean,
)
from dictbench.train.checkpoint import CheckpointPlan
from dictbench.train.lockstep import Member, train_group
from dictbench.train.trainer import TrainingFailed, TrainRecord

BYTES_PER_ELEMENT = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class RunFolder:
    """Where a run writes, how it speaks, and whether it continues an interrupted run."""

    out: Path
    log: Any = print
    resuming: bool = False


def choose_source(spec: RunSpec, d_model: int) -> str:
    """``budget.source`` with "auto" decided: stream when the cache would be large."""
    b = spec.budget
    if b.source != "auto":
        return b.source
    size = b.train_tokens * d_model * BYTES_PER_ELEMENT[b.cache_dtype]
    return "stream" if size > STREAM_ABOVE_BYTES else "cache"


@dataclass
class TrainingData:
    """Where the run's training windows come from: a cache entry, or the model itself."""

    store: ActivationStore | None = None
    subject: Any = None
    hook: str = ""
    tokens: np.ndarray | None = None  # the windows to stream (stream mode)
    fingerprint: str = ""  # the cache entry's, or the one it would have
    ctx_len: int = 0
    _first_block_mean: np.ndarray | None = field(default=None, repr=False)

    @property
    def keep(self) -> np.ndarray:
        # A store knows its own special positions (a synthetic store has none).
        return self.store.keep if self.store is not None else keep_positions(self.ctx_len)

    @property
    def streamed(self) -> bool:
        return self.store is None

    def windows(self) -> Any:
        if self.store is not None:
            return CacheWindows(self.store)
        # Under torchrun the ranks split the model's forward (bench/train/batch_stream.py); every
        # rank reads these windows together: training, and ``mean`` (called on all ranks).
        return ModelWindows(self.subject, self.hook, self.tokens, self.keep, ranks_share=True)

    def buffer(self, spec: RunSpec, seed: int) -> ShuffleBuffer:
        source = self.windows()
        kept = int(self.keep.sum())
        block = block_windows_for(spec.budget.buffer_tokens, kept, source.n_windows)
        return ShuffleBuffer(source, self.keep, block, seed)

    def d_model(self) -> int:
        return int(self.store.acts.shape[-1] if self.store is not None else self.subject.d_model)

    def mean(self, spec: RunSpec) -> tuple[np.ndarray, int | None]:
        """The mean training activation (the mean-ablation baseline), and the number of
        tokens it covers when that is only part of the split (streamed, several blocks).
        Every rank of a data-parallel run calls it: a streamed first block is shared."""
        if self.store is not None:
            return self.store.mean, None
        if self._first_block_mean is None:
            buffer = self.buffer(spec, spec.seed)
            self._first_block_mean = chunked_mean(buffer.block(0).acts, self.keep)
        buffer_windows = min(
            len(self.tokens),
            block_windows_for(spec.budget.buffer_tokens, int(self.keep.sum()), len(self.tokens)),
        )
        partial = buffer_windows < len(self.tokens)
        return self._first_block_mean, buffer_windows * int(self.keep.sum()) if partial else None


def build_member(p: Any, spec: RunSpec, data: TrainingData, device: str, run: RunFolder) -> Member:
    """The SAE of plan entry ``p`` (seeded init) with its optimiser settings and
    checkpoint plan."""
    seed = getattr(p, "seed", spec.seed)
    cfg = p.cls.config_class(d_in=data.d_model(), d_sae=spec.budget.d_sae, **p.params)
    torch.manual_seed(seed)  # the same init stream for every SAE of one seed
    sae = p.cls(cfg)
    lr = getattr(cfg, "lr", None) or spec.budget.lr
    betas = (getattr(cfg, "adam_beta1", 0.9), getattr(cfg, "adam_beta2", 0.999))
    identity = {
        "sae_id": p.sae_id,
        "baseline": class_ref(p.cls),
        "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else repr(cfg),
        "budget": dataclasses.asdict(spec.budget),
        "seed": seed,
        "lr": lr,
        "betas": list(betas),
        "grad_clip": getattr(cfg, "grad_clip", None),
        "train_cache": data.fingerprint,
        "device": str(device),
        "torch": torch.__version__,
    }
    ckpt = CheckpointPlan(
        path=run.out / "checkpoints" / f"{p.sae_id}.safetensors",
        every=spec.checkpoint_every_steps,
        identity=identity,
        resume=run.resuming,
        log=run.log,
    )
    return Member(sae, p.sae_id, lr, betas, getattr(cfg, "grad_clip", None), ckpt, device)


def group_key(p: Any, spec: RunSpec) -> tuple[int, bool]:
    return getattr(p, "seed", spec.seed), bool(getattr(p.cls, "needs_downstream", False))


def train_planned(
    todo: list[Any], spec: RunSpec, data: TrainingData, devices: list[str], run: RunFolder
) -> dict[str, tuple[Member, TrainRecord | TrainingFailed]]:
    """Train every SAE of ``todo`` in its lockstep group; results by SAE id."""
    groups: dict[tuple[int, bool], list[Any]] = {}
    for p in todo:
        groups.setdefault(group_key(p, spec), []).append(p)
    results: dict[str, tuple[Member, TrainRecord | TrainingFailed]] = {}
    for (seed, sequence_mode), plans in groups.items():
        members = [
            build_member(p, spec, data, devices[i % len(devices)], run) for i, p in enumerate(plans)
        ]
        ids = ", ".join(m.sae_id for m in members)
        how = "streamed from the model" if data.streamed else "from the activation cache"
        run.log(f"training {len(members)} SAE(s) in lockstep, seed {seed}, {how}: {ids}")
        buffer = data.buffer(spec, seed)
        try:
            outs = train_group(members, buffer, spec.budget, sequence_mode, data.subject, spec.hook)
        except TrainingFailed as e:  # the group's data itself is unusable
            outs = {m.sae_id: e for m in members}
        for m in members:
            results[m.sae_id] = (m, outs[m.sae_id])
    return results


def record_failure(
    p: Any, m: Member, err: TrainingFailed, out: Path, context: dict[str, Any], log: Any
) -> None:
    kept = m.ckpt.path if m.ckpt is not None and m.ckpt.path.exists() else None
    log(f"training failed: {err}" + (f" (last good checkpoint: {kept})" if kept else ""))
    details = {"error": str(err), "status": "failed", "failed_at_step": err.step}
    details["last_checkpoint"] = str(kept) if kept else None
    write_record(RecordTarget(out, p.sae_id, p.method, context), "training", {}, details, 0)


def save_trained(
    p: Any, m: Member, rec: TrainRecord, out: Path, context: dict[str, Any], stream: str
) -> Any:
    """Fold the scale, save the SAE and its training record; returns the SAE in eval mode."""
    sae = m.sae
    if rec.input_scale != 1.0:
        sae.fold_input_scale(rec.input_scale)
    sae.eval()
    training = {**dataclasses.asdict(rec), "source": stream}
    meta = {"sae_id": p.sae_id, "hook": context["hook"], "model": context["model"]}
    save_sae(sae, out / "saes" / p.sae_id, {**meta, "training": training})
    train_metrics = {
        "wall_seconds": rec.wall_seconds,
        "tokens": rec.tokens,
        "flops_estimate": rec.flops_estimate,
        **{f"final_{k}": v for k, v in rec.final_terms.items()},
    }
    if rec.train_frac_dead is not None:
        train_metrics["train_frac_dead"] = rec.train_frac_dead
    # The weights' hash lets --resume trust the saved SAE instead of retraining it.
    weights_sha = atomic.file_sha256(out / "saes" / p.sae_id / WEIGHTS)
    details = {**training, "weights_sha256": weights_sha}
    target = RecordTarget(out, p.sae_id, p.method, context)
    write_record(target, "training", train_metrics, details, rec.tokens)
    if m.ckpt is not None and distributed.is_main():
        checkpoint.remove(m.ckpt.path)  # the saved SAE and its record supersede it
    return sae
