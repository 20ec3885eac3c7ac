"""The contract every dictionary learner meets, so the trainer and the tasks never
special-case a method.

A baseline is an ``nn.Module`` with SAELens-style parameter names and shapes
(``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``, ``b_dec``) so that
export is a rename. Optional hooks let a method add what its paper prescribes
(decoder constraints, coefficient warm-up, data-dependent init) without the
trainer knowing which method it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from dictbench.baselines.init import project_out_radial_grad, renormalise_rows_


@dataclass
class LossOutput:
    """The scalar to minimise plus named terms, logged per SAE so runs can be compared."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    # The batch's latents (detached), when the method has them: lets the trainer track
    # which latents fire without a second encode.
    latents: torch.Tensor | None = None
    # Or only which latents fired in the batch (bool [d_sae]): a method that never builds
    # the dense [batch, d_sae] latent matrix (TopK's firing pairs) gives this instead,
    # and the trainer prefers it to ``latents``.
    fired: torch.Tensor | None = None


@dataclass
class BaselineConfig:
    """Shared fields every method's hyperparameter dataclass extends.

    ``lr`` of None means "use the run's budget learning rate": methods whose paper
    prescribes a rate set it here.
    """

    d_in: int = 0
    d_sae: int = 0
    lr: float | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    grad_clip: float | None = None

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


class Baseline(nn.Module):
    """Base class for dictbench's own baselines; third-party classes need not inherit it.

    Required (checked by :func:`dictbench.registry.check_baseline_class`):
    ``encode``, ``decode``, ``forward``, ``loss`` and a ``W_dec`` parameter.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[BaselineConfig]] = BaselineConfig
    sparsity_knob: ClassVar[str] = ""
    needs_downstream: ClassVar[bool] = False

    def __init__(self, cfg: BaselineConfig):
        super().__init__()
        self.cfg = cfg
        self.total_steps = 1

    # --- the interface -------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def loss(self, batch: torch.Tensor, step: int) -> LossOutput:
        raise NotImplementedError

    # --- optional hooks the trainer calls when present ---------------------------------
    def on_train_start(self, total_steps: int, sample: torch.Tensor) -> None:
        """Data-dependent initialisation and schedule lengths; ``sample`` is training data."""
        self.total_steps = max(1, total_steps)

    def before_optimizer_step(self) -> None:
        """Edit gradients (e.g. remove the component that would grow decoder norms)."""

    def after_step(self) -> None:
        """Re-impose constraints the optimiser step broke (e.g. unit-norm decoder rows)."""

    def fold_input_scale(self, scale: float) -> None:
        """Make a model trained on ``scale * x`` act on raw ``x``; see trainer docs."""
        raise NotImplementedError

    def config_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self.cfg, f.name) for f in fields(self.cfg)}


class UnitNormDecoder:
    """Mixin for methods whose paper keeps decoder rows at unit norm."""

    W_dec: nn.Parameter

    def before_optimizer_step(self) -> None:
        project_out_radial_grad(self.W_dec)

    def after_step(self) -> None:
        renormalise_rows_(self.W_dec)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear ramp from 1/warmup to 1, used for coefficient warm-ups."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)
