"""Standard L1 SAE (Towards Monosemanticity; Cunningham et al. 2023).

f = ReLU((x - b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec,
loss = ||x - x_hat||^2 (summed over dims, mean over tokens) + lambda * ||f||_1,
with decoder rows held at unit norm so the L1 penalty cannot be dodged by
shrinking f and growing W_dec.

A training step (``sparse_ops.relu_sae_terms``, shared with ``l1_april``) computes the
encoder matmul once, without a graph, and counts the firing latents. Early in training
about half fire and the step stays dense, with the encoder's backward fused
(baselines/dense_ops.py: no matmul for the centred input's gradient). Once fewer than
5% fire, as in any useful L1 SAE, the decoder and every gradient go through the firing
(token, latent) pairs only (baselines/sparse_ops.py). Both paths compute the same loss
and gradients (tests/test_kernel_reference.py, tests/test_fast_paths.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
from dictbench.baselines.init import (
    geometric_median,
    tied_init,
)
from dictbench.baselines.sparse_ops import relu_sae_terms
from dictbench.registry import register_baseline


@dataclass
class L1Config(BaselineConfig):
    l1_coefficient: float = 5.0
    # Fraction of training over which lambda ramps up linearly from 0; dictionary_learning
    # uses 2000 of its steps, a fraction keeps short and long budgets comparable.
    l1_warmup_frac: float = 0.05


@register_baseline
class L1SAE(UnitNormDecoder, Baseline):
    name = "l1"
    config_class = L1Config
    sparsity_knob = "l1_coefficient"
    # Checked: the loss is a mean over tokens, so a batch split across processes trains
    # exactly as one (bench/train/distributed.py). Not inherited: a subclass checks it again.
    data_parallel_exact = True

    def saelens_export(self) -> SAELensExport:
        """At inference this is a standard ReLU SAE that subtracts b_dec from its input."""
        return saelens_export_as("standard", self, {"apply_b_dec_to_input": True})

    def __init__(self, cfg: L1Config):
        super().__init__(cfg)
        self.cfg: L1Config = cfg
        self.W_dec, self.W_enc, self.b_enc, self.b_dec = tied_init(cfg.d_in, cfg.d_sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def loss(self, batch: torch.Tensor, step: int) -> LossOutput:
        # f >= 0, so |f| = f: the L1 term is the plain sum of f, with no sign pass.
        x_hat, f_sum, f0 = relu_sae_terms(batch, self, centred=True, weighted=False)
        l1 = f_sum / batch.shape[0]
        mse = (x_hat - batch).pow(2).sum(-1).mean()
        warm = warmup_factor(step, int(self.cfg.l1_warmup_frac * self.total_steps))
        total = mse + self.cfg.l1_coefficient * warm * l1
        return LossOutput(total, {"mse": mse.detach(), "l1": l1.detach()}, f0)

    def on_train_start(self, total_steps: int, sample: torch.Tensor) -> None:
        super().on_train_start(total_steps, sample)
        with torch.no_grad():
            self.b_dec.copy_(geometric_median(sample))

    def fold_input_scale(self, scale: float) -> None:
        # ReLU is positively homogeneous: dividing both biases by `scale` makes the
        # latents 1/scale of the trained ones and the reconstruction the raw activation.
        fold_biases(self, scale, "b_enc", "b_dec")
