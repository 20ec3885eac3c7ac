"""BatchTopK SAE (Bussmann, Leask and Nanda 2024).

Training: keep the k*B largest of ReLU(pre) over the whole batch of B tokens, so k
is the AVERAGE number of active latents per token and busy tokens may use more.
That rule depends on the batch, so inference instead uses one global threshold:
f = pre * (pre > threshold), a JumpReLU. The paper estimates the threshold as the
average, over batches, of the smallest positive kept activation. We track that
quantity as a bias-corrected exponential moving average (beta 0.999, the EMA
dictionary_learning uses): for runs much shorter than 1/(1 - beta) steps it is the
plain average over all batches, as in the paper, and on long runs it forgets the
early batches whose encoder no longer exists. Everything else (AuxK, unit-norm
decoder, init) is the TopK SAE's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dictbench.baselines.topk import TopKConfig, TopKSAE
from dictbench.registry import register_baseline


@dataclass
class BatchTopKConfig(TopKConfig):
    # Average number of latents kept per token (the paper sweeps k; 32 as TopK's default).
    k: int = 32
    threshold_beta: float = 0.999


@register_baseline
class BatchTopKSAE(TopKSAE):
    name = "batchtopk"
    config_class = BatchTopKConfig
    sparsity_knob = "k"

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        self.cfg: BatchTopKConfig = cfg
        # Inference threshold; 0 (a plain ReLU) until a training batch has been seen.
        self.register_buffer("threshold", torch.zeros(()))
        # 1 - beta^t after t updates: the EMA's bias correction.
        self.register_buffer("threshold_weight", torch.zeros(()))

    def sparsify(self, pre: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return pre * (pre > self.threshold)
        acts = torch.relu(pre)
        flat = acts.reshape(-1)
        n_tokens = flat.numel() // acts.shape[-1]
        vals, idx = flat.topk(min(int(self.cfg.k * n_tokens), flat.numel()))
        return torch.zeros_like(flat).scatter(0, idx, vals).view_as(acts)

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pairs ``sparsify`` keeps in training mode, grouped by token."""
        flat = torch.relu(pre).reshape(-1)
        n_keep = min(int(self.cfg.k * pre.shape[0]), flat.numel())
        idx = flat.topk(n_keep).indices.sort().values  # row-major: grouped by token
        return idx // pre.shape[-1], idx % pre.shape[-1]

    def observe(self, z: torch.Tensor) -> None:
        super().observe(z)
        # Smallest positive kept activation; a batch with none leaves the EMA alone.
        # Written with torch.where so that a GPU never waits on a host-side branch.
        smallest = torch.where(z > 0, z, torch.inf).amin()
        seen = torch.isfinite(smallest)
        beta, w = self.cfg.threshold_beta, self.threshold_weight
        new_w = beta * w + (1 - beta)
        new_t = (beta * w * self.threshold + (1 - beta) * smallest) / new_w
        self.threshold.copy_(torch.where(seen, new_t, self.threshold))
        self.threshold_weight.copy_(torch.where(seen, new_w, w))

    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        with torch.no_grad():
            self.threshold.div_(scale)
