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

import numpy as np
import torch

from dictbench.baselines.base import (
    SAELensExport,
    saelens_export_as,
)
from dictbench.baselines.topk import TopKConfig, TopKSAE
from dictbench.registry import register_baseline
from dictbench.train.distributed import gather_across, min_across, rank, rows_across, sum_across


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
    # Checked: the loss is a mean over tokens, so a batch split across processes trains
    # exactly as one (bench/train/distributed.py). Not inherited: a subclass checks it again.
    data_parallel_exact = True

    def saelens_export(self) -> SAELensExport:
        """At inference BatchTopK is pre * 1[pre > t] with one threshold t >= 0 (an EMA of
        positive activations, 0 before training): SAELens's JumpReLU with every threshold t."""
        every = self.threshold.detach().reshape(1).expand(self.cfg.d_sae)
        return saelens_export_as("jumprelu", self, threshold=every)

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
        n_global = rows_across(pre.shape[0])
        if n_global != pre.shape[0]:  # the batch is split across processes
            n_keep = min(int(self.cfg.k * n_global), n_global * pre.shape[-1])
            idx = _global_top_indices(flat, n_keep)
            return idx // pre.shape[-1], idx % pre.shape[-1]
        n_keep = min(int(self.cfg.k * pre.shape[0]), flat.numel())
        idx = top_flat_indices(flat, n_keep)  # row-major: grouped by token
        return idx // pre.shape[-1], idx % pre.shape[-1]

    def observe(self, cols: torch.Tensor, vals: torch.Tensor, n_tokens: int) -> torch.Tensor:
        fired = super().observe(cols, vals, n_tokens)
        # Smallest positive kept activation; a batch with none leaves the EMA alone.
        # Written with torch.where so that a GPU never waits on a host-side branch.
        inf = vals.new_full((1,), torch.inf)
        positive = torch.cat([torch.where(vals > 0, vals, torch.inf), inf])
        smallest = min_across(positive.amin())  # over the global batch
        seen = torch.isfinite(smallest)
        beta, w = self.cfg.threshold_beta, self.threshold_weight
        new_w = beta * w + (1 - beta)
        new_t = (beta * w * self.threshold + (1 - beta) * smallest) / new_w
        self.threshold.copy_(torch.where(seen, new_t, self.threshold))
        self.threshold_weight.copy_(torch.where(seen, new_w, w))
        return fired

    def fold_input_scale(self, scale: float) -> None:
        super().fold_input_scale(scale)
        with torch.no_grad():
            self.threshold.div_(scale)


def top_flat_indices(flat: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Ascending indices of the ``n_keep`` largest of ``flat`` (values >= 0), leaving out
    zeros: a kept zero adds nothing to the reconstruction and gets no gradient through
    the ReLU. Through the cut-off value and a mask, not ``topk``: with k*B = 131k of
    19M values, ``topk`` plus sorting its indices took ~1.2 s on 2 CPU cores, numpy's
    partition plus the mask ~0.25 s. Entries equal to the cut-off fill the remaining
    places in index order, so exactly ``n_keep`` are kept when enough are positive."""
    if n_keep <= 0:
        return torch.zeros(0, dtype=torch.long, device=flat.device)
    pos = flat.numel() - n_keep
    if flat.device.type == "cpu":
        values = flat.detach()
        if values.dtype not in (torch.float32, torch.float64):  # e.g. bf16 under autocast
            values = values.float()
        cut = float(np.partition(values.numpy(), pos)[pos])
    else:
        cut = float(torch.kthvalue(flat, pos + 1).values)
    above = torch.nonzero(flat > cut).squeeze(1)
    if cut <= 0:
        return above
    ties = torch.nonzero(flat == cut).squeeze(1)[: n_keep - above.numel()]
    if ties.numel() == 0:
        return above
    return torch.cat([above, ties]).sort().values


def _global_top_indices(flat: torch.Tensor, n_keep: int) -> torch.Tensor:
    """This process's share, as sorted flat indices, of the ``n_keep`` largest values of
    the batch split across processes (bench/train/distributed.py): what one process would keep
    from the whole batch.

    Each rank's own top ``n_keep`` holds all of its entries in the global top, so their
    union gives the global cut-off value t. Entries above t are kept; entries equal to t
    fill the remaining places in rank order, so exactly ``n_keep`` are kept. When t is 0
    the zeros are left out: a kept zero adds nothing to the reconstruction and has no
    gradient through the ReLU, so the result is the same.
    """
    local = flat.topk(min(n_keep, flat.numel())).values
    t = gather_across(local).topk(n_keep).values[-1]
    above = flat > t
    if not bool(t > 0):
        return torch.nonzero(above).reshape(-1)
    ties = flat == t
    need = n_keep - sum_across(above.sum())
    before = gather_across(ties.sum().reshape(1))[: rank()].sum()
    take = (need - before).clamp(0, int(ties.sum()))
    first_ties = ties & (torch.cumsum(ties.to(torch.int64), 0) <= take)
    return torch.nonzero(above | first_ties).reshape(-1)
