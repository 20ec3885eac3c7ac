"""The pieces of one training step that every baseline shares, so differences in results
come from the methods: optimiser, learning-rate schedule, autocast, the update with the
method's hooks, the handle e2e methods use to run the model past the hook, and the
training record.

The loop itself is bench/train/lockstep.py (every SAE of a run steps on the same batch from
bench/train/batch_stream.py); ``train`` here trains one SAE on a cache entry through it.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.torch_version import TorchVersion

from dictbench import faults  # noqa: F401  (tests patch trainer.faults.point: the loop calls it)
from dictbench.data.cache import ActivationStore
from dictbench.errors import UserError
from dictbench.spec import BudgetSpec

if TYPE_CHECKING:
    from dictbench.train.lockstep import Member


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

    def __init__(self, subject: Any, hook: str, scale: float, want_residuals: bool = False):
        self.subject, self.hook, self.scale = subject, hook, scale
        self.position = subject.stream_position(hook)
        # The clean pass of the current batch, computed once for every SAE of a lockstep
        # group (they all step on the same batch). With ``want_residuals`` the residuals
        # are captured too, so a group mixing e2e and e2e_ds runs it once.
        self.want_residuals = want_residuals
        self._clean_for: Any = None
        self._clean: tuple[torch.Tensor, list[torch.Tensor] | None] | None = None

    def clean(self, batch: Any, residuals: bool = False) -> tuple[torch.Tensor, Any]:
        """(logits, residuals or None) of the unmodified model on ``batch``, without
        gradients: memoised for the batch object, so N SAEs pay for one clean pass."""
        hit = self._clean_for is batch and self._clean is not None
        if hit and (not residuals or self._clean[1] is not None):
            return self._clean
        with torch.no_grad():
            if residuals or self.want_residuals:
                out: Any = self.logits_and_residuals(batch.acts, batch.token_ids)
            else:
                out = (self.logits(batch.acts, batch.token_ids), None)
        self._clean_for, self._clean = batch, out
        return out

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
    member: Member,
    store: ActivationStore,
    budget: BudgetSpec,
    seed: int,
    subject: Any = None,
    hook: str = "",
) -> TrainRecord:
    """Train ``member.sae`` in place on a cache entry: a lockstep group of one
    (bench/train/lockstep.py; a ``Member`` holds the SAE with its id, learning rate,
    betas, clip, checkpoint plan and device). With ``member.ckpt``, its state is saved
    every ``ckpt.every`` steps and at the end, and ``ckpt.resume`` continues from a valid
    saved state: the same batches, optimiser moments and RNG streams, so the result is
    bit-identical on CPU. ``subject`` and ``hook``: the model past the hook, for methods
    that train through it."""
    from dictbench.train.batch_stream import CacheWindows, ShuffleBuffer, block_windows_for
    from dictbench.train.lockstep import train_group

    source = CacheWindows(store)
    keep = store.keep
    block = block_windows_for(budget.buffer_tokens, int(keep.sum()), source.n_windows)
    buffer = ShuffleBuffer(source, keep, block, seed)
    sequence_mode = bool(getattr(member.sae, "needs_downstream", False))
    out = train_group([member], buffer, budget, sequence_mode, subject, hook)[member.sae_id]
    if isinstance(out, TrainingFailed):
        raise out
    return out
