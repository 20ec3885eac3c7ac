"""One training loop for every baseline, so differences in results come from the methods.

Every SAE in a run sees the same tokens in the same order: the order is a seeded
permutation of the cached training tokens, independent of the method. The loop
owns what is common (optimiser, learning-rate schedule, activation scaling, NaN
guard, dead-latent tracking, budget accounting) and calls the baseline's optional
hooks for what is method-specific.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.torch_version import TorchVersion
from tqdm.auto import tqdm

from dictbench import checkpoint, distributed, faults
from dictbench.cache import ActivationStore
from dictbench.checkpoint import CheckpointError, CheckpointPlan, TrainState
from dictbench.errors import UserError
from dictbench.spec import BudgetSpec


class TrainingFailed(RuntimeError):
    """This SAE cannot go on (non-finite loss, activations or weights); ``step`` says where."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


@dataclass
class TrainRecord:
    steps: int
    tokens: int
    wall_seconds: float
    flops_estimate: float
    input_scale: float
    final_terms: dict[str, float] = field(default_factory=dict)
    train_frac_dead: float | None = None
    train_dead_window_tokens: int = 0


def token_order(store: ActivationStore, seed: int) -> np.ndarray:
    """Flat indices (window * ctx + position) of the non-special training tokens, shuffled."""
    ctx = store.acts.shape[1]
    keep = np.flatnonzero(store.keep)
    flat = (np.arange(store.acts.shape[0])[:, None] * ctx + keep[None, :]).reshape(-1)
    return flat[np.random.default_rng([seed, 17]).permutation(len(flat))]


def gather(store: ActivationStore, idx: np.ndarray) -> torch.Tensor:
    flat = store.acts.reshape(-1, store.acts.shape[-1])
    order = np.argsort(idx, kind="stable")  # sorted reads are sequential on the memmap
    rows = np.empty((len(idx), flat.shape[1]), dtype=np.float32)
    rows[order] = flat[idx[order]]
    return torch.from_numpy(rows)


@dataclass
class SequenceBatch:
    """Whole windows in sequence order, for objectives that run the model past the hook.

    ``acts`` are in training units (scaled like token batches); ``keep`` marks the
    positions an SAE replaces (special positions keep their activation).
    """

    acts: torch.Tensor  # [B, T, d]
    token_ids: torch.Tensor  # [B, T]
    keep: torch.Tensor  # [T] bool


class DownstreamHandle:
    """The subject model after the hook point, taking activations in training units."""

    def __init__(self, subject: Any, hook: str, scale: float):
        self.subject, self.hook, self.scale = subject, hook, scale
        self.position = subject.stream_position(hook)

    def logits(self, acts: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Float32 logits whatever the model's dtype: the KL and its gradient are taken
        from them, and bf16 log-probabilities are too coarse for a KL near zero."""
        return self.subject.run_from(self.hook, acts / self.scale, token_ids).float()

    def logits_and_residuals(
        self, acts: torch.Tensor, token_ids: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits plus the residual stream after every later layer (raw units)."""
        resid: list[torch.Tensor] = []

        def grab(_m: Any, _i: Any, out: Any) -> None:
            resid.append((out[0] if isinstance(out, tuple) else out).float())

        layers = self.subject.layers
        handles = [layers[i].register_forward_hook(grab) for i in range(self.position, len(layers))]
        try:
            logits = self.logits(acts, token_ids)
        finally:
            for h in handles:
                h.remove()
        return logits, resid

    def params_after_hook(self) -> int:
        layers = self.subject.layers
        n = sum(
            p.numel() for i in range(self.position, len(layers)) for p in layers[i].parameters()
        )
        head = self.subject.model.get_output_embeddings()
        return n + (head.weight.numel() if head is not None else 0)


def window_order(store: ActivationStore, seed: int) -> np.ndarray:
    """Seeded order of whole training windows, shared by every sequence-batch method."""
    return np.random.default_rng([seed, 23]).permutation(store.acts.shape[0])


def activation_scale(store: ActivationStore, order: np.ndarray, n: int = 32768) -> float:
    """The factor s with E||s x||^2 = d_in, from a fixed sample of training tokens."""
    x = gather(store, order[: min(n, len(order))]).double()
    return float(math.sqrt(x.shape[1] / x.pow(2).sum(-1).mean().item()))


def lr_factor(step: int, total: int, warmup_frac: float, decay_frac: float) -> float:
    warm = int(warmup_frac * total)
    decay = int(decay_frac * total)
    if warm and step < warm:
        return (step + 1) / warm
    if decay and step >= total - decay:
        return max(0.0, (total - step) / decay)
    return 1.0


def flops_per_token(sae: torch.nn.Module) -> float:
    """6 FLOPs per matmul weight per token (forward 2, backward 4): the usual estimate."""
    custom = getattr(sae, "flops_per_token", None)
    if callable(custom):
        return float(custom())
    d_sae, d_in = sae.W_dec.shape
    return 6.0 * 2 * d_in * d_sae


def make_optimizer(params: Any, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """Adam with its fused kernel where torch has one for the device (CPU from torch 2.4,
    CUDA): one pass over each tensor instead of six. That kernel reads the parameter, its
    gradient and both moments as flat memory, so all four must share one layout: a
    transposed parameter with a contiguous moment is updated silently wrong on CPU (torch
    2.13). The trainer keeps them aligned (``align_layouts`` here, ``checkpoint.load`` on
    resume). Elsewhere (older torch, other devices) the one-tensor-at-a-time loop."""
    params = list(params)
    if _has_fused_adam({p.device.type for p in params}):
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    return torch.optim.Adam(params, lr=lr, betas=betas)


def _has_fused_adam(device_types: set[str]) -> bool:
    """Asked before building: torch accepts fused=True for any device and fails only at
    the first step where it has no kernel (MPS, XPU, ... in some versions)."""
    if device_types == {"cuda"}:
        return True
    return device_types == {"cpu"} and TorchVersion(torch.__version__) >= "2.4"


def align_layouts(opt: torch.optim.Optimizer) -> None:
    """Give every gradient its parameter's strides, for the fused kernel (see
    ``make_optimizer``). Autograd already does for gradients it accumulates; this catches a
    method hook that replaces ``p.grad`` with a tensor laid out differently."""
    for group in opt.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is not None and g.stride() != p.stride():
                p.grad = torch.empty_like(p).copy_(g)


def autocast(device: str, dtype: str | None) -> Any:
    """The context a training loss runs in: torch.autocast to ``dtype``, or nothing.
    The backward, Adam and the decoder constraints run outside it, in float32."""
    if dtype is None:
        return contextlib.nullcontext()
    kind = torch.device(device).type
    if kind == "cuda" and dtype == "bfloat16" and not _cuda_has_bf16():
        raise UserError(
            "budget.autocast: bfloat16 needs a GPU with bf16 support (Ampere or newer); "
            f"{torch.cuda.get_device_name(torch.device(device))} has none: set it to null"
        )
    return torch.autocast(kind, dtype=getattr(torch, dtype))


@functools.cache
def _cuda_has_bf16() -> bool:
    return bool(torch.cuda.is_bf16_supported())


def apply_update(sae: Any, opt: torch.optim.Optimizer, grad_clip: float | None) -> None:
    """Everything a step does after its gradients are final (and, under data parallel,
    averaged): the method's gradient hook, the optional clip, Adam, the method's
    constraint hook. One function so benchmarks time exactly the trainer's step."""
    if hasattr(sae, "before_optimizer_step"):
        sae.before_optimizer_step()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), grad_clip)
    align_layouts(opt)
    opt.step()
    if hasattr(sae, "after_step"):
        sae.after_step()


def train(
    sae: Any,
    sae_id: str,
    store: ActivationStore,
    budget: BudgetSpec,
    seed: int,
    lr: float,
    device: str = "cpu",
    betas: tuple[float, float] = (0.9, 0.999),
    grad_clip: float | None = None,
    subject: Any = None,
    hook: str = "",
    ckpt: CheckpointPlan | None = None,
) -> TrainRecord:
    """Train ``sae`` in place. With ``ckpt``, its state is saved every ``ckpt.every`` steps
    and at the end, and ``ckpt.resume`` continues from a valid saved state: the same
    batches, optimiser moments and RNG streams, so the result is bit-identical on CPU."""
    order = token_order(store, seed)
    scale = activation_scale(store, order) if budget.normalize_activations else 1.0
    if not (math.isfinite(scale) and scale > 0):
        raise TrainingFailed(
            f"{sae_id}: non-finite activations in the training tokens (normalisation scale "
            f"{scale}) before step 0",
            0,
        )
    sequence_mode = bool(getattr(sae, "needs_downstream", False))
    if sequence_mode:
        if subject is None:
            raise TrainingFailed(f"{sae_id}: this method needs the subject model past the hook")
        keep_np = store.keep
        kept = int(keep_np.sum())
        seqs = max(1, budget.batch_size // kept)
        per_step = seqs * kept
        windows = window_order(store, seed)
        keep_t = torch.from_numpy(keep_np).to(device)

        n_items = seqs
        lo, hi = distributed.shard(seqs)  # this rank's whole windows (all of them alone)

        def get_batch(step: int) -> Any:
            idx = np.sort(windows[step * seqs + lo : step * seqs + hi])
            acts = torch.from_numpy(np.ascontiguousarray(store.acts[idx])).to(device) * scale
            ids = torch.from_numpy(store.tokens[idx].astype(np.int64))
            return SequenceBatch(acts, ids, keep_t)

        sae.downstream = DownstreamHandle(subject, hook, scale)
    else:
        per_step = budget.batch_size
        n_items = per_step
        lo, hi = distributed.shard(per_step)  # this rank's rows of each global batch

        def get_batch(step: int) -> Any:
            rows = order[step * per_step + lo : step * per_step + hi]
            return gather(store, rows).to(device) * scale

    steps = budget.train_tokens // per_step
    if steps * per_step > len(order):
        raise TrainingFailed(
            f"{sae_id}: the cache holds {len(order)} training tokens, the budget needs "
            f"{steps * per_step}"
        )
    sae.to(device)
    sae.train()  # a reloaded SAE comes back in eval mode (e.g. BatchTopK's threshold path)
    sample = gather(store, order[: min(8192, len(order))]).to(device) * scale
    if not bool(torch.isfinite(sample).all()):  # it initialises the SAE (e.g. b_dec)
        raise TrainingFailed(
            f"{sae_id}: non-finite activations in the first {len(sample)} training tokens "
            "(the initialisation sample) before step 0",
            0,
        )
    if hasattr(sae, "on_train_start"):
        sae.on_train_start(steps, sample)
    dp = distributed.group()  # data-parallel across ranks (bench/distributed.py), or None
    if dp is not None:
        if (hi - lo) * dp.world != n_items:
            raise UserError(f"{sae_id}: a training batch does not split into {dp.world} shards")
        distributed.broadcast_module(sae)  # every rank starts from rank 0's weights
    opt = make_optimizer(sae.parameters(), lr, betas)
    d_sae = sae.W_dec.shape[0]
    dead_window_start = int(steps * 0.75)
    fired = torch.zeros(d_sae, dtype=torch.bool, device=device)
    terms: dict[str, float] = {}
    flops_tok = flops_per_token(sae)  # before the loop: e2e counts the model past the hook
    start, wall_before, has_latents = 0, 0.0, False
    identity: dict[str, Any] = {}
    if ckpt is not None:
        identity = {
            **ckpt.identity,
            "total_steps": steps,
            "tokens_per_step": per_step,
            "input_scale": scale,
            "sequence_mode": sequence_mode,
        }
        if dp is not None and ckpt.resume:
            # Every rank loads the bytes rank 0 reads: the same state, even when the run
            # folder is not shared with the other nodes.
            start, fired, terms, wall_before, has_latents = _resume_sharded(
                ckpt, identity, sae, opt, device, sae_id, steps, fired
            )
        elif ckpt.resume and ckpt.path.exists():
            try:
                st = checkpoint.load(ckpt.path, identity, sae, opt, device)
            except CheckpointError as e:
                ckpt.log(f"{sae_id}: checkpoint {ckpt.path} not used: {e}; training from step 0")
            else:
                start, fired, terms = st.step, st.fired, st.terms
                wall_before, has_latents = st.wall_seconds, st.has_latents
                ckpt.log(f"{sae_id}: resuming training at step {start} of {steps} ({ckpt.path})")

    def save_checkpoint(next_step: int) -> None:
        # A checkpoint must be a state worth going back to: never save broken weights.
        if not all(bool(torch.isfinite(p).all()) for p in sae.parameters()):
            last = next_step - 1
            raise TrainingFailed(f"{sae_id}: non-finite weights after step {last}", last)
        fired_all = distributed.any_across(fired)  # the latents any rank saw fire
        state = TrainState(
            next_step, fired_all, terms, wall_before + time.perf_counter() - t0, has_latents
        )
        if distributed.is_main():  # the only writer
            checkpoint.save(ckpt.path, identity, sae, opt, state, steps, device)

    t0 = time.perf_counter()
    step = start
    params = list(sae.parameters())
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(distributed.sharded())
        bar = tqdm(
            range(start, steps),
            initial=start,
            total=steps,
            desc=f"train {sae_id}",
            unit="step",
            mininterval=2.0,
            **({} if distributed.is_main() else {"disable": True}),  # one bar per run
        )
        for step in bar:
            faults.point(f"train:{sae_id}:step={step}")
            batch = get_batch(step)
            acts = batch.acts if isinstance(batch, SequenceBatch) else batch
            if dp is None and not bool(torch.isfinite(acts).all()):
                raise TrainingFailed(
                    f"{sae_id}: non-finite activations in the training batch at step {step}", step
                )
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(
                    step, steps, budget.lr_warmup_frac, budget.lr_decay_frac
                )
            with autocast(device, budget.autocast):
                out = sae.loss(batch, step)
            if dp is None and not torch.isfinite(out.total):
                raise TrainingFailed(f"{sae_id}: non-finite loss at step {step}", step)
            opt.zero_grad(set_to_none=True)
            out.total.backward()
            if dp is not None:
                _average_and_check(params, acts, out.total, sae_id, step)
            apply_update(sae, opt, grad_clip)
            batch_fired = getattr(out, "fired", None)
            latents = getattr(out, "latents", None)
            has_latents = batch_fired is not None or latents is not None
            if step >= dead_window_start and has_latents:
                fired |= batch_fired if batch_fired is not None else (latents > 0).any(0)
            if step % 20 == 0 or step == steps - 1:
                terms = _mean_terms({"total": out.total.detach(), **out.terms})
                bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items()}, refresh=False)
            if ckpt is not None and ckpt.every and (step + 1) % ckpt.every == 0:
                if step + 1 < steps:
                    save_checkpoint(step + 1)
        bar.close()
        if ckpt is not None and start < steps:
            save_checkpoint(steps)
        fired = distributed.any_across(fired)
        if not distributed.same_on_all_ranks(sae):
            raise TrainingFailed(f"{sae_id}: the ranks' weights differ after training", steps - 1)
    finally:
        stack.close()
        if sequence_mode:
            sae.downstream = None  # the handle holds the model; the trained SAE must not
    wall = wall_before + time.perf_counter() - t0
    window = (steps - dead_window_start) * per_step
    return TrainRecord(
        steps=steps,
        tokens=steps * per_step,
        wall_seconds=wall,
        flops_estimate=flops_tok * steps * per_step,
        input_scale=scale,
        final_terms=terms,
        train_frac_dead=float(1 - fired.float().mean()) if has_latents else None,
        train_dead_window_tokens=window if has_latents else 0,
    )


def _mean_terms(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Logged loss terms of the global batch: the mean over ranks of the shards' per-token
    means (exact for equal shards); the shard's own values in one process."""
    if distributed.group() is None or not terms:
        return {k: float(v) for k, v in terms.items()}
    vals = torch.stack([v.detach().float().reshape(()) for v in terms.values()])
    vals = distributed.sum_across(vals) / distributed.world()
    return dict(zip(terms, vals.tolist(), strict=True))


def _average_and_check(
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


def _resume_sharded(
    ckpt: CheckpointPlan,
    identity: dict[str, Any],
    sae: Any,
    opt: torch.optim.Optimizer,
    device: str,
    sae_id: str,
    steps: int,
    fired: torch.Tensor,
) -> tuple[int, torch.Tensor, dict[str, float], float, bool]:
    """``--resume`` in a data-parallel run: rank 0 reads the checkpoint and sends its bytes,
    every rank restores from those bytes, so all continue from one state."""
    import tempfile
    from pathlib import Path

    raw = ckpt.path.read_bytes() if distributed.is_main() and ckpt.path.exists() else None
    raw = distributed.broadcast_object(raw)
    if raw is None:
        return 0, fired, {}, 0.0, False
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ckpt.path.name
        path.write_bytes(raw)
        try:
            st = checkpoint.load(path, identity, sae, opt, device)
        except CheckpointError as e:
            ckpt.log(f"{sae_id}: checkpoint {ckpt.path} not used: {e}; training from step 0")
            return 0, fired, {}, 0.0, False
    ckpt.log(f"{sae_id}: resuming training at step {st.step} of {steps} ({ckpt.path})")
    return st.step, st.fired, st.terms, st.wall_seconds, st.has_latents
