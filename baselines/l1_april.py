"""L1 SAE with Anthropic's April 2024 training update ("Circuits Updates, April 2024").

    f = ReLU(x W_enc + b_enc),   x_hat = f W_dec + b_dec
    loss = ||x - x_hat||^2 + lambda * sum_i f_i ||W_dec,i||

(squared norm summed over dimensions, everything averaged over tokens). Compared
with the standard L1 SAE (``l1``): the input is not centred by b_dec, and the decoder
is unconstrained; instead the penalty weights each latent by its decoder row's norm,
which is what makes it invariant to moving scale between f_i and W_dec,i (the job
the unit-norm constraint does in ``l1``). Decoder rows start as random directions
of norm 0.1 with W_enc = W_dec^T and zero biases; lambda ramps up linearly over the
first 5% of steps; gradients are clipped to norm 1. The learning-rate decay over the
last 20% of training that the update prescribes is the run's own schedule
(``budget.lr_decay_frac``, 0.2 by default).

SAELens's documented recipe for this method: lr 5e-5, lambda 5, d_sae = 16 d_in,
Adam (0.9, 0.999). Parameters use SAELens's names and shapes: W_enc [d_in, d_sae],
b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dictbench.baselines.base import (
    Baseline,
    BaselineConfig,
    LossOutput,
    SAELensExport,
    fold_biases,
    saelens_export_as,
    warmup_factor,
)
from dictbench.baselines.init import (
    tied_init,
)
from dictbench.baselines.sparse_ops import relu_sae_terms
from dictbench.registry import register_baseline


@dataclass
class L1AprilConfig(BaselineConfig):
    """Hyperparameters (defaults from the April 2024 update).

    - ``l1_coefficient`` (lambda): 5.0, Anthropic's and SAELens's value. Anthropic
      normalise activations so E||x||^2 = d_in, which is exactly what dictbench's
      trainer does, so their lambda applies unchanged.
    - ``l1_warmup_frac``: lambda ramps linearly from 0 over the first 5% of steps.
    - ``init_decoder_norm``: 0.1, the norm of every decoder row at init.
    - ``grad_clip``: 1.0 (global gradient norm).
    - ``lr``: None means the run's budget rate. SAELens documents 5e-5 for long
      budgets (hundreds of millions of tokens); short dictbench budgets need more.
    """

    l1_coefficient: float = 5.0
    l1_warmup_frac: float = 0.05
    init_decoder_norm: float = 0.1
    grad_clip: float | None = 1.0


@register_baseline
class L1AprilSAE(Baseline):
    name = "l1_april"
    config_class = L1AprilConfig
    sparsity_knob = "l1_coefficient"
    # Checked: the loss is a mean over tokens, so a batch split across processes trains
    # exactly as one (bench/train/distributed.py). Not inherited: a subclass checks it again.
    data_parallel_exact = True

    def saelens_export(self) -> SAELensExport:
        """At inference this is a standard ReLU SAE on the raw input (no b_dec subtracted)."""
        return saelens_export_as("standard", self, {"apply_b_dec_to_input": False})

    def __init__(self, cfg: L1AprilConfig):
        super().__init__(cfg)
        self.cfg: L1AprilConfig = cfg
        params = tied_init(cfg.d_in, cfg.d_sae, cfg.init_decoder_norm)
        self.W_dec, self.W_enc, self.b_enc, self.b_dec = params

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def loss(self, batch: torch.Tensor, step: int) -> LossOutput:
        # sum_b sum_i f_bi ||W_dec,i||: the row norms are in the graph, so the penalty
        # also pulls on W_dec's scale, which stops the free decoder growing to dodge it.
        x_hat, weighted, f0 = relu_sae_terms(batch, self, centred=False, weighted=True)
        l1 = weighted / batch.shape[0]
        mse = (x_hat - batch).pow(2).sum(-1).mean()
        warm = warmup_factor(step, int(self.cfg.l1_warmup_frac * self.total_steps))
        total = mse + self.cfg.l1_coefficient * warm * l1
        return LossOutput(total, {"mse": mse.detach(), "l1": l1.detach()}, f0)

    def fold_input_scale(self, scale: float) -> None:
        # relu(s x W_enc + b_enc) / s = relu(x W_enc + b_enc / s), and
        # (f_s W_dec + b_dec) / s = (f_s / s) W_dec + b_dec / s: divide both biases.
        fold_biases(self, scale, "b_enc", "b_dec")
