"""Train a group of SAEs in lockstep: every SAE takes its step on a batch before the next
batch is drawn.

Why lockstep: the common budget then holds by construction (one stream of batches,
bench/train/batch_stream.py, serves them all), and whatever produces the batches (the subject
model's forward in stream mode, a sequential cache read otherwise, the clean pass past the
hook for e2e methods) is paid once for the group instead of once per SAE. Each SAE keeps
its own optimiser, schedule position, checkpoint and failure: a NaN in one drops it out
and the others carry on with exactly the batches they would have had alone.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dictbench import faults, resources
from dictbench.errors import UserError
from dictbench.spec import BudgetSpec
from dictbench.train import checkpoint, distributed
from dictbench.train.batch_stream import ShuffleBuffer
from dictbench.train.checkpoint import CheckpointError, CheckpointPlan, TrainState
from dictbench.train.trainer import (
    DownstreamHandle,
    SequenceBatch,
    TrainingFailed,
    TrainRecord,
    apply_update,
    autocast,
    flops_per_token,
    lr_factor,
    make_optimizer,
)
from dictbench.train.trainer_dp import average_and_check, mean_terms, rank0_copy

SCALE_SAMPLE_TOKENS = 32768  # tokens the normalisation scale is estimated from
INIT_SAMPLE_TOKENS = 8192  # tokens a method's data-dependent initialisation sees


@dataclass
class Member:
    """One SAE of a lockstep group and everything its training owns."""

    sae: Any
    sae_id: str
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = None
    ckpt: CheckpointPlan | None = None
    device: str = "cpu"
    # Filled in by the group.
    opt: Any = None
    start: int = 0
    fired: Any = None
    terms: dict[str, float] = field(default_factory=dict)
    wall_before: float = 0.0
    seconds: float = 0.0
    has_latents: bool = False
    identity: dict[str, Any] = field(default_factory=dict)
    flops_tok: float = 0.0
    failed: TrainingFailed | None = None


@dataclass
class Layout:
    """How a group's batches are cut from the stream."""

    sequence_mode: bool
    per_step: int  # tokens per step
    n_items: int  # rows (tokens) or windows in a global batch
    steps: int
    scale: float


def plan_layout(buffer: ShuffleBuffer, budget: BudgetSpec, sequence_mode: bool) -> Layout:
    kept = buffer.kept
    if sequence_mode:
        seqs = max(1, budget.batch_size // kept)
        per_step, n_items = seqs * kept, seqs
    else:
        per_step = n_items = budget.batch_size
    return Layout(sequence_mode, per_step, n_items, budget.train_tokens // per_step, 1.0)


def _scale(buffer: ShuffleBuffer, normalize: bool, label: str) -> float:
    """The factor s with E||s x||^2 = d_in, from the stream's first tokens."""
    if not normalize:
        return 1.0
    x = buffer.tokens(0, min(SCALE_SAMPLE_TOKENS, buffer.n_tokens)).double()
    scale = float(math.sqrt(x.shape[1] / x.pow(2).sum(-1).mean().item()))
    if not (math.isfinite(scale) and scale > 0):
        raise TrainingFailed(
            f"{label}: non-finite activations in the training tokens (normalisation scale "
            f"{scale}) before step 0",
            0,
        )
    return scale


class BatchMaker:
    """The group's batch at a step, this rank's share of it, on each device asked for."""

    def __init__(self, buffer: ShuffleBuffer, layout: Layout, device: str):
        self.buffer, self.layout = buffer, layout
        self.lo, self.hi = distributed.shard(layout.n_items)
        self.keep = torch.from_numpy(buffer.keep)
        self._step, self._on = -1, {}

    def get(self, step: int, device: str) -> Any:
        if step != self._step:
            self._step, self._on = step, {}
        if device not in self._on:
            self._on[device] = self._make(step, device)
        return self._on[device]

    def _make(self, step: int, device: str) -> Any:
        # Each rank reads its slice, naming the global batch: every rank then reads the
        # blocks that batch touches at this step (a stream the ranks share needs that).
        lay, n = self.layout, self.layout.n_items
        whole = (step * n, (step + 1) * n)
        lo, hi = whole[0] + self.lo, whole[0] + self.hi
        if lay.sequence_mode:
            acts, ids = self.buffer.windows(lo, hi, whole)
            acts_t = torch.from_numpy(acts).to(device) * lay.scale
            ids_t = torch.from_numpy(ids.astype(np.int64))
            return SequenceBatch(acts_t, ids_t, self.keep.to(device))
        return self.buffer.tokens(lo, hi, whole).to(device) * lay.scale


def train_group(
    members: list[Member],
    buffer: ShuffleBuffer,
    budget: BudgetSpec,
    sequence_mode: bool,
    subject: Any = None,
    hook: str = "",
) -> dict[str, TrainRecord | TrainingFailed]:
    """Train every member in lockstep on ``buffer``'s stream; a member that fails is
    reported as its ``TrainingFailed`` and the others go on."""
    label = members[0].sae_id if len(members) == 1 else f"{len(members)} SAEs"
    layout = plan_layout(buffer, budget, sequence_mode)
    if layout.steps * layout.per_step > buffer.n_tokens:
        raise TrainingFailed(
            f"{label}: the cache holds {buffer.n_tokens} training tokens, the budget needs "
            f"{layout.steps * layout.per_step}"
        )
    layout.scale = _scale(buffer, budget.normalize_activations, label)
    sample = buffer.tokens(0, min(INIT_SAMPLE_TOKENS, buffer.n_tokens)) * layout.scale
    if not bool(torch.isfinite(sample).all()):  # it initialises the SAE (e.g. b_dec)
        raise TrainingFailed(
            f"{label}: non-finite activations in the first {len(sample)} training tokens "
            "(the initialisation sample) before step 0",
            0,
        )
    handle = None
    if sequence_mode:
        if subject is None:
            raise TrainingFailed(f"{label}: this method needs the subject model past the hook")
        residuals = any(getattr(m.sae, "clean_residuals", False) for m in members)
        handle = DownstreamHandle(subject, hook, layout.scale, want_residuals=residuals)
    maker = BatchMaker(buffer, layout, members[0].device)
    for m in members:
        _catch(m, lambda m=m: _prepare(m, layout, sample, handle, maker))
    try:
        _loop(members, layout, maker, budget)
    finally:
        for m in members:
            if sequence_mode:
                m.sae.downstream = None  # the handle holds the model; the SAE must not
    return {m.sae_id: m.failed or _record(m, layout) for m in members}


def _catch(m: Member, fn: Any) -> None:
    if m.failed is not None:
        return
    try:
        fn()
    except TrainingFailed as e:
        m.failed = e


def _prepare(m: Member, lay: Layout, sample: torch.Tensor, handle: Any, maker: Any) -> None:
    sae = m.sae
    if lay.sequence_mode:
        sae.downstream = handle
    sae.to(m.device)
    sae.train()  # a reloaded SAE comes back in eval mode (e.g. BatchTopK's threshold path)
    if hasattr(sae, "on_train_start"):
        sae.on_train_start(lay.steps, sample.to(m.device))
    dp = distributed.group()
    if dp is not None:
        if (maker.hi - maker.lo) * dp.world != lay.n_items:
            raise UserError(f"{m.sae_id}: a training batch does not split into {dp.world} shards")
        distributed.broadcast_module(sae)  # every rank starts from rank 0's weights
    m.opt = make_optimizer(sae.parameters(), m.lr, m.betas)
    m.fired = torch.zeros(sae.W_dec.shape[0], dtype=torch.bool, device=m.device)
    m.flops_tok = flops_per_token(sae)  # e2e counts the model past the hook: handle is set
    if m.ckpt is not None:
        m.identity = {
            **m.ckpt.identity,
            "total_steps": lay.steps,
            "tokens_per_step": lay.per_step,
            "input_scale": lay.scale,
            "sequence_mode": lay.sequence_mode,
        }
        _restore(m, lay.steps)


def _restore(m: Member, steps: int) -> None:
    ckpt = m.ckpt
    assert ckpt is not None
    if distributed.group() is not None and ckpt.resume:
        # Every rank loads the bytes rank 0 reads: the same state on every node.
        with rank0_copy(ckpt.path) as copy:
            st = _load(m, copy, steps) if copy is not None else None
    elif ckpt.resume and ckpt.path.exists():
        st = _load(m, ckpt.path, steps)
    else:
        return
    if st is not None:
        m.start, m.fired, m.terms = st.step, st.fired, st.terms
        m.wall_before, m.has_latents = st.wall_seconds, st.has_latents


def _load(m: Member, path: Path, steps: int) -> TrainState | None:
    """The state saved at ``path`` (``m.ckpt.path`` or a rank's copy of it), restored into
    ``m``'s SAE and optimiser, or None (said in one line) if it cannot be used."""
    ckpt = m.ckpt
    assert ckpt is not None
    try:
        st = checkpoint.load(path, m.identity, m.sae, m.opt, m.device)
    except CheckpointError as e:
        ckpt.log(f"{m.sae_id}: checkpoint {ckpt.path} not used: {e}; training from step 0")
        return None
    ckpt.log(f"{m.sae_id}: resuming training at step {st.step} of {steps} ({ckpt.path})")
    return st


def _loop(members: list[Member], lay: Layout, maker: BatchMaker, budget: BudgetSpec) -> None:
    live = [m for m in members if m.failed is None]
    first = min((m.start for m in live), default=lay.steps)
    dead_window_start = int(lay.steps * 0.75)
    label = members[0].sae_id if len(members) == 1 else f"{len(members)} SAEs"
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(distributed.sharded())
        bar = tqdm(
            range(first, lay.steps),
            initial=first,
            total=lay.steps,
            desc=f"train {label}",
            unit="step",
            mininterval=2.0,
            **({} if distributed.is_main() else {"disable": True}),  # one bar per run
        )
        for step in bar:
            active = [m for m in live if m.failed is None and m.start <= step]
            if not active:
                if all(m.failed is not None for m in live):
                    break
                continue
            t0 = time.perf_counter()
            maker.get(step, active[0].device)
            share = (time.perf_counter() - t0) / len(active)  # the batch's cost, split
            for m in active:
                t1 = time.perf_counter()
                _catch(m, lambda m=m, s=step: _step(m, s, lay, maker, budget, dead_window_start))
                m.seconds += share + time.perf_counter() - t1
            if len(members) == 1 and active[0].failed is None:
                bar.set_postfix({k: f"{v:.3g}" for k, v in active[0].terms.items()}, refresh=False)
        bar.close()
        for m in live:
            _catch(m, lambda m=m: _finish(m, lay))
    finally:
        stack.close()


def _step(m: Member, step: int, lay: Layout, maker: BatchMaker, budget: BudgetSpec, dws: int):
    sae, opt = m.sae, m.opt
    faults.point(f"train:{m.sae_id}:step={step}")
    batch = maker.get(step, m.device)
    acts = batch.acts if isinstance(batch, SequenceBatch) else batch
    dp = distributed.group()
    if dp is None and not bool(torch.isfinite(acts).all()):
        raise TrainingFailed(
            f"{m.sae_id}: non-finite activations in the training batch at step {step}", step
        )
    for g in opt.param_groups:
        g["lr"] = m.lr * lr_factor(step, lay.steps, budget.lr_warmup_frac, budget.lr_decay_frac)
    with autocast(m.device, budget.autocast):
        out = sae.loss(batch, step)
    if dp is None and not torch.isfinite(out.total):
        raise TrainingFailed(f"{m.sae_id}: non-finite loss at step {step}", step)
    opt.zero_grad(set_to_none=True)
    out.total.backward()
    if dp is not None:
        average_and_check(list(sae.parameters()), acts, out.total, m.sae_id, step)
    apply_update(sae, opt, m.grad_clip)
    batch_fired = getattr(out, "fired", None)
    latents = getattr(out, "latents", None)
    m.has_latents = batch_fired is not None or latents is not None
    if step >= dws and m.has_latents:
        m.fired |= batch_fired if batch_fired is not None else (latents > 0).any(0)
    if step % 20 == 0 or step == lay.steps - 1:
        m.terms = mean_terms({"total": out.total.detach(), **out.terms})
    every = m.ckpt.every if m.ckpt is not None else 0
    if every and (step + 1) % every == 0 and step + 1 < lay.steps:
        _save(m, step + 1, lay.steps)


def _save(m: Member, next_step: int, steps: int) -> None:
    # A checkpoint must be a state worth going back to: never save broken weights.
    if not all(bool(torch.isfinite(p).all()) for p in m.sae.parameters()):
        last = next_step - 1
        raise TrainingFailed(f"{m.sae_id}: non-finite weights after step {last}", last)
    fired_all = distributed.any_across(m.fired)  # the latents any rank saw fire
    wall = m.wall_before + m.seconds
    state = TrainState(next_step, fired_all, m.terms, wall, m.has_latents, steps)
    if distributed.is_main() and m.ckpt is not None:  # the only writer
        with resources.disk_full_is_user_error(m.ckpt.path):  # one line, not a traceback
            checkpoint.save(m.ckpt.path, m.identity, m.sae, m.opt, state, m.device)


def _finish(m: Member, lay: Layout) -> None:
    if m.ckpt is not None and m.start < lay.steps:
        _save(m, lay.steps, lay.steps)
    m.fired = distributed.any_across(m.fired)
    if not distributed.same_on_all_ranks(m.sae):
        raise TrainingFailed(f"{m.sae_id}: the ranks' weights differ after training", lay.steps - 1)


def _record(m: Member, lay: Layout) -> TrainRecord:
    window = (lay.steps - int(lay.steps * 0.75)) * lay.per_step
    return TrainRecord(
        steps=lay.steps,
        tokens=lay.steps * lay.per_step,
        wall_seconds=m.wall_before + m.seconds,
        flops_estimate=m.flops_tok * lay.steps * lay.per_step,
        input_scale=lay.scale,
        final_terms=m.terms,
        train_frac_dead=float(1 - m.fired.float().mean()) if m.has_latents else None,
        train_dead_window_tokens=window if m.has_latents else 0,
    )
