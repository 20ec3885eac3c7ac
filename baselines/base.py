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

# What ``saelens_export`` returns: (SAELens architecture, one of bench/io/saelens.py's
# ARCHITECTURES; its tensors by SAELens name; extra SAELensSAE settings such as {"k": 32}
# or {"apply_b_dec_to_input": False}).
SAELensExport = tuple[str, dict[str, torch.Tensor], dict[str, Any]]
ENCODER_DECODER = ("W_enc", "b_enc", "W_dec", "b_dec")


def saelens_tensors(
    sae: nn.Module, names: tuple[str, ...] = ENCODER_DECODER, **given: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The module's tensors ``names`` (detached float32 on the CPU), plus ``given`` ones
    (e.g. a threshold the method stores in another form), for ``saelens_export``."""
    out = {n: getattr(sae, n) for n in names}
    out.update(given)
    return {n: t.detach().float().cpu() for n, t in out.items()}


def saelens_export_as(
    architecture: str,
    sae: nn.Module,
    settings: dict[str, Any] | None = None,
    **given: torch.Tensor,
) -> SAELensExport:
    """The usual body of a ``saelens_export``: the SAELens ``architecture``, the module's
    tensors that architecture has (by the same names; ``given`` ones replace or add the
    tensors the method stores in another form) and extra SAELensSAE ``settings``. Which
    tensors an architecture has is said once, in bench/io/saelens_module.py."""
    from dictbench.io.saelens_module import TENSORS

    names = tuple(n for n in TENSORS[architecture] if n not in given)
    return architecture, saelens_tensors(sae, names, **given), dict(settings or {})


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
    """The method contract (docs/writing-a-method.md has it with a complete example).
    Third-party classes need not inherit this, but must provide what it lists.

    Checked before training (``registry.check_baseline_class``): an ``nn.Module`` with
    ``encode(x)``, ``decode(f)``, ``forward(x)``, ``loss(batch, step) -> LossOutput``;
    ``config_class``, a dataclass with ``d_in`` and ``d_sae`` (extend ``BaselineConfig``:
    it already carries d_in, d_sae, lr, adam_beta1/2, grad_clip); ``__init__(cfg)`` keeps
    ``self.cfg`` and creates ``W_dec`` [d_sae, d_in]. ``fold_input_scale(scale)`` is
    needed unless ``budget.normalize_activations: false``.

    Training: ``loss`` gets float32 [batch_size, d_in] (scaled to E||x||^2 = d_in when
    normalising) and returns the total, named terms, and the batch's detached
    ``latents`` or ``fired`` (bool [d_sae]) for the trainer's dead-latent count. That count
    does not flow back: an AuxK-style method keeps its own buffer, updated in ``loss``
    (topk.py). Optional hooks: ``on_train_start``, ``before_optimizer_step``,
    ``after_step``, ``flops_per_token``.

    Scoring: after ``fold_input_scale`` the harness calls ``.eval()`` and, under
    no_grad, ``encode`` on raw [n, d_in] batches of at most ``eval.batch_tokens`` tokens
    (n varies), ``forward`` for the downstream splice.

    Facts declared on the class body (not inherited): ``saelens_export()`` (how it
    exports; without it, it cannot), ``data_parallel_exact`` (its loss is a per-token
    mean, so a split batch trains exactly). ``sparsity_knob`` names the config field that
    sets sparsity. In a spec a class outside dictbench is ``method: "module:Class"``.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[BaselineConfig]] = BaselineConfig
    sparsity_knob: ClassVar[str] = ""
    needs_downstream: ClassVar[bool] = False
    data_parallel_exact: ClassVar[bool] = False

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


class UnitNormDecoder:
    """Mixin for methods whose paper keeps decoder rows at unit norm."""

    W_dec: nn.Parameter

    def before_optimizer_step(self) -> None:
        project_out_radial_grad(self.W_dec)

    def after_step(self) -> None:
        renormalise_rows_(self.W_dec)


def fold_biases(sae: nn.Module, scale: float, *names: str) -> None:
    """Divide the tensors ``names`` of ``sae`` by ``scale`` in place (no graph).

    The usual ``fold_input_scale``: for a method whose pre-activations are positively
    homogeneous in (input, biases), dividing the biases by the training scale ``s``
    makes the SAE on raw ``x`` give latents 1/s of the trained ones and the raw
    reconstruction. Each method says beside its call why that holds for it."""
    with torch.no_grad():
        for name in names:
            getattr(sae, name).div_(scale)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear ramp from 1/warmup to 1, used for coefficient warm-ups."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)
