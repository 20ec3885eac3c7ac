"""End-to-end SAE (Braun et al. 2024, arXiv 2405.12241), the "e2e" variant.

The SAE is spliced into the subject model and trained on the KL divergence between
the model's next-token distribution with and without it, plus sparsity:
    loss = kl_coeff * KL(p_clean || p_sae) + phi * mean_tokens ||f||_1 / d_in.
It never sees a reconstruction loss, so it is free to drop what the model does not
use: the paper's headline is fewer active latents at the same CE loss increase, at
the price of a worse MSE.

f = ReLU(x W_enc + b_enc) (no input centring), x_hat = f (W_dec / ||W_dec rows||) + b_dec:
the decoder rows are normalised in the forward pass, as in the paper's code.
The paper's GPT-2 settings: lr 5e-4 with warm-up and cosine decay to 0.1x, grad clip
10, dictionary 60 x d_in, ~400M tokens; no dead-latent handling. Here the run's
common schedule and budget apply, and each step runs only the layers after the hook
(twice: a no-grad clean pass and the spliced pass with activation gradients).
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
    unit_rows,
)
from dictbench.registry import register_baseline
from dictbench.score.divergence import kl_clean_to_sae


@dataclass
class E2EConfig(BaselineConfig):
    sparsity_coefficient: float = 1.5  # phi in the paper
    kl_coefficient: float = 1.0
    sparsity_warmup_frac: float = 0.05
    grad_clip: float | None = 10.0


@register_baseline
class E2ESAE(Baseline):
    name = "e2e"
    config_class = E2EConfig
    sparsity_knob = "sparsity_coefficient"
    # Checked: the loss is a mean over tokens, so a batch split across processes trains
    # exactly as one (bench/train/distributed.py). Not inherited: a subclass checks it again.
    data_parallel_exact = True
    needs_downstream = True

    def saelens_export(self) -> SAELensExport:
        """At inference this is a standard ReLU SAE on the raw input; decode normalises the decoder
        rows, so SAELens gets the normalised rows."""
        unit = unit_rows(self.W_dec.detach())
        return saelens_export_as("standard", self, {"apply_b_dec_to_input": False}, W_dec=unit)

    def __init__(self, cfg: E2EConfig):
        super().__init__(cfg)
        self.cfg: E2EConfig = cfg
        self.W_dec, self.W_enc, self.b_enc, self.b_dec = tied_init(cfg.d_in, cfg.d_sae)
        self.downstream = None  # set by the trainer for the duration of training

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ unit_rows(self.W_dec) + self.b_dec

    def splice(self, batch: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the kept positions by the reconstruction; return (spliced, latents)."""
        f = self.encode(batch[:, keep])
        spliced = batch.clone()
        spliced[:, keep] = self.decode(f)
        return spliced, f

    def sparsity(self, f: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        l1 = f.abs().sum(-1).mean() / self.cfg.d_in
        warm = warmup_factor(step, int(self.cfg.sparsity_warmup_frac * self.total_steps))
        return l1, self.cfg.sparsity_coefficient * warm * l1

    def loss(self, batch, step: int) -> LossOutput:  # batch: trainer.SequenceBatch
        spliced, f = self.splice(batch.acts, batch.keep)
        with torch.no_grad():  # the clean pass is shared by every SAE stepping on this batch
            lp_clean = torch.log_softmax(self.downstream.clean(batch)[0], -1)
        lp_sae = torch.log_softmax(self.downstream.logits(spliced, batch.token_ids), -1)
        # Position 0 is special and unchanged; its prediction is identical on both sides.
        kl = kl_clean_to_sae(lp_clean[:, 1:], lp_sae[:, 1:])
        l1, penalty = self.sparsity(f, step)
        total = self.cfg.kl_coefficient * kl + penalty
        terms = {"kl": kl.detach(), "l1": l1.detach()}
        return LossOutput(total, terms, f.detach().reshape(-1, f.shape[-1]))

    def flops_per_token(self) -> float:
        sae = 6.0 * 2 * self.cfg.d_in * self.cfg.d_sae
        if self.downstream is None:
            return sae
        # Clean forward (2P), spliced forward (2P) and its activation-gradient backward (2P).
        return sae + 6.0 * self.downstream.params_after_hook()

    def fold_input_scale(self, scale: float) -> None:
        fold_biases(self, scale, "b_enc", "b_dec")
