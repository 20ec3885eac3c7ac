"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; recipe of Gemma Scope,
Lieberum et al. 2024, section 3).

pre = (x - b_dec) W_enc + b_enc, theta = exp(log_threshold) > 0 per latent,
f = pre * H(pre - theta), x_hat = f W_dec + b_dec,
loss = ||x - x_hat||^2 + lambda * sum_i H(pre_i - theta_i)   (an L0 penalty).

H has no useful derivative, so theta is trained with the paper's straight-through
estimators, rectangle kernel K(u) = 1[|u| < 1/2] of bandwidth eps:
  d f / d theta = -(theta / eps) K((pre - theta) / eps),  d f / d pre = H(pre - theta),
  d H / d theta = -(1 / eps) K((pre - theta) / eps),      d H / d pre = 0.
So the L0 term moves only the thresholds; the encoder learns from reconstruction.
Two pitfalls avoided: dictionary_learning applies the step to the post-activation
(its issue #55) and replaces the L0 penalty by a quadratic to a target L0.

Units. The paper and Gemma Scope train on activations divided by a fixed scalar so
that E||x||^2 = 1, and give eps = 0.001, theta_init = 0.001 and lambda in those
units. dictbench trains on E||x||^2 = d_in, i.e. on u * x with u = sqrt(d_in).
Pre-activations, thresholds and eps scale with u and the squared error with u^2,
so the equivalent problem has eps and theta_init times u and lambda times u^2. The
config holds the paper's numbers; the model multiplies by u = sqrt(E||x||^2),
measured on the training sample in ``on_train_start`` (sqrt(d_in) before that),
which stays right when a run turns activation normalisation off.

Centring. The input is centred on b_dec before encoding, as in SAELens's JumpReLU
and every other dictbench baseline; the paper (eq. 1) and Gemma Scope encode x
itself. The functions are the same family (b_enc absorbs -b_dec W_enc), but here b_dec
also receives the encoder's gradient, so training can differ slightly.

Decoder. The L0 penalty does not depend on decoder norms, so nothing forces a
constraint; Gemma Scope (section 3.2) nevertheless keeps decoder rows at unit norm
(gradient projection, renormalise after each step) and so do we: no decoder-norm
weighting appears in the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dictbench.baselines.base import (
    Baseline,
    BaselineConfig,
    LossOutput,
    SAELensExport,
    UnitNormDecoder,
    fold_biases,
    saelens_export_as,
    warmup_factor,
)
from dictbench.baselines.dense_ops import centred_encoder
from dictbench.baselines.init import (
    tied_init,
)
from dictbench.registry import register_baseline


def _window(pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """K((pre - theta) / eps) with the rectangle kernel K(u) = 1[|u| < 1/2]."""
    return ((pre - theta).abs() < eps / 2).to(pre.dtype)


class JumpReLUFn(torch.autograd.Function):
    """pre * H(pre - theta); theta's gradient by the rectangle-kernel STE."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        pre, theta = ctx.saved_tensors
        g_pre = grad * (pre > theta).to(grad.dtype)
        g_theta = -(theta / ctx.eps) * _window(pre, theta, ctx.eps) * grad
        return g_pre, g_theta.sum_to_size(theta.shape), None


class StepFn(torch.autograd.Function):
    """H(pre - theta); no gradient to pre, theta's by the rectangle-kernel STE."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        pre, theta = ctx.saved_tensors
        g_theta = -(1.0 / ctx.eps) * _window(pre, theta, ctx.eps) * grad
        return None, g_theta.sum_to_size(theta.shape), None


@dataclass
class JumpReLUConfig(BaselineConfig):
    """Defaults from Gemma Scope section 3.2. lambda, eps and theta_init are in the
    paper's units (activations with E||x||^2 = 1); see the module docstring. ``lr`` None
    uses the run's rate (the paper: 7e-5 with batch 4096)."""

    # lambda. The papers sweep it per target L0 and publish no single value; 1e-3 is a
    # starting point for such a sweep.
    l0_coefficient: float = 1e-3
    bandwidth: float = 0.001
    init_threshold: float = 0.001
    # lambda ramps linearly from 0; the paper uses 10,000 of its ~1-2M steps (under 1%).
    # A fraction (as l1's) keeps short and long budgets comparable.
    l0_warmup_frac: float = 0.05
    # The paper's Adam betas are (0, 0.999).
    adam_beta1: float = 0.0


@register_baseline
class JumpReLUSAE(UnitNormDecoder, Baseline):
    name = "jumprelu"
    config_class = JumpReLUConfig
    sparsity_knob = "l0_coefficient"
    # Checked: the loss is a mean over tokens, so a batch split across processes trains
    # exactly as one (bench/train/distributed.py). Not inherited: a subclass checks it again.
    data_parallel_exact = True

    def saelens_export(self) -> SAELensExport:
        """At inference this is SAELens's JumpReLU with threshold exp(log_threshold)."""
        return saelens_export_as("jumprelu", self, threshold=self.log_threshold.detach().exp())

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        self.cfg: JumpReLUConfig = cfg
        # Gemma Scope initialises both biases at zero, as tied_init does.
        self.W_dec, self.W_enc, self.b_enc, self.b_dec = tied_init(cfg.d_in, cfg.d_sae)
        # sqrt(E||x||^2) of the training inputs: converts the paper's units to ours.
        self.input_rms = math.sqrt(cfg.d_in)
        self.log_threshold = nn.Parameter(
            torch.full((cfg.d_sae,), math.log(cfg.init_threshold * self.input_rms))
        )

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    @property
    def eps(self) -> float:
        return self.cfg.bandwidth * self.input_rms

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """The plain formula, so gradients reach ``x`` too (attribution, splicing)."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return JumpReLUFn.apply(self.pre_acts(x), self.threshold, self.eps)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def loss(self, batch: torch.Tensor, step: int) -> LossOutput:
        # Float32 even under budget.autocast: the threshold's gradient counts the
        # pre-activations within eps/2 of it, and eps (0.001 x the input RMS) is below
        # bf16's resolution at their scale; in bf16 that gradient measured as noise
        # (cosine 0.35 to float32's, tests/test_autocast.py).
        with torch.autocast(batch.device.type, enabled=False):
            # Training treats the batch as data: skip the input-gradient matmul.
            pre = centred_encoder(batch, self.b_dec, self.W_enc, self.b_enc)
        theta = self.threshold
        f = JumpReLUFn.apply(pre, theta, self.eps)
        mse = (self.decode(f) - batch).pow(2).sum(-1).mean()
        l0 = StepFn.apply(pre, theta, self.eps).sum(-1).mean()
        lam = self.cfg.l0_coefficient * self.input_rms**2
        warm = warmup_factor(step, int(self.cfg.l0_warmup_frac * self.total_steps))
        total = mse + lam * warm * l0
        return LossOutput(total, {"mse": mse.detach(), "l0": l0.detach()}, f.detach())

    def on_train_start(self, total_steps: int, sample: torch.Tensor) -> None:
        super().on_train_start(total_steps, sample)
        rms = float(sample.double().pow(2).sum(-1).mean().sqrt())
        if math.isfinite(rms) and rms > 0:  # an all-zero sample keeps sqrt(d_in)
            self.input_rms = rms
        with torch.no_grad():
            self.log_threshold.fill_(math.log(self.cfg.init_threshold * self.input_rms))

    def fold_input_scale(self, scale: float) -> None:
        # Pre-activations of x are those of scale * x divided by scale once both biases
        # are; dividing theta too keeps every comparison pre > theta, so f scales by 1/s.
        fold_biases(self, scale, "b_enc", "b_dec")
        with torch.no_grad():
            self.log_threshold.sub_(math.log(scale))
        self.input_rms /= scale
