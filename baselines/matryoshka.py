"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen and Nanda 2025, "Learning
Multi-Level Features with Matryoshka Sparse Autoencoders").

The dictionary is split into consecutive groups; prefix m is the first m groups. Every
prefix must reconstruct the input on its own: the loss sums, over prefixes, the squared
error of decoding only that prefix's kept latents (plus ``b_dec``). A latent in group g
therefore gets gradient from the losses of prefixes g, g+1, ..., and the early latents,
trained to do the most with the least, learn general features instead of leaving them
to be absorbed by specific later ones.

Everything else is BatchTopK's (baselines/batchtopk.py): the k*B largest activations of
the batch are kept (once, for the whole dictionary: the prefixes reuse the same
selection, as in the paper's code and SAELens), inference uses the learnt JumpReLU
threshold, decoder rows are unit norm, and AuxK revives dead latents against the full
reconstruction's residual (the reference implementation's choice; SAELens's default).

The loss is a SUM over prefixes, as the paper writes it and SAELens trains it; the
paper's code takes the mean, which differs by the constant factor 1/#groups (Adam is
almost insensitive to it, but it weighs AuxK #groups times more).

Default group sizes are the paper's code's (d_sae/64, d_sae/64, d_sae/32, d_sae/16,
d_sae/8, d_sae/4, d_sae/2: doubling widths after a first pair). Training takes the
sparse kernels' path: each group decodes its own kept pairs, so the decoder's work is
the same as BatchTopK's, plus one [B, d_in] sum and error per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from dictbench.baselines.auxk import data_variance, sparse_auxk_loss
from dictbench.baselines.base import LossOutput, SAELensExport
from dictbench.baselines.batchtopk import BatchTopKConfig, BatchTopKSAE
from dictbench.baselines.sparse_ops import selected_preacts, sparse_decode
from dictbench.errors import SpecError
from dictbench.registry import register_baseline

# The paper's code (bartbussmann/matryoshka_sae, main.py) as fractions of d_sae.
DEFAULT_GROUPS = (1 / 64, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


@dataclass
class MatryoshkaConfig(BatchTopKConfig):
    # Group widths: fractions summing to 1, or integer sizes summing to d_sae. None: the
    # paper's (DEFAULT_GROUPS). Fractions are rounded at the cumulative boundaries, and a
    # group that rounds to no latent is dropped.
    groups: list[float] | None = None


def group_ends(groups: Any, d_sae: int) -> tuple[int, ...]:
    """The end (exclusive) of each group: strictly increasing, the last one d_sae."""
    spec = DEFAULT_GROUPS if groups is None else groups
    if isinstance(spec, (str, bytes)) or not hasattr(spec, "__iter__"):
        raise SpecError(f"matryoshka groups: expected a list of sizes or fractions, got {spec!r}")
    values = [float(v) for v in spec]
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise SpecError(f"matryoshka groups: need positive sizes or fractions, got {list(spec)}")
    total = sum(values)
    if all(v == int(v) for v in values) and int(total) == d_sae and total > 1:
        ends = [int(e) for e in _cumsum(values)]
    elif abs(total - 1.0) <= 1e-6:
        ends = [round(c * d_sae) for c in _cumsum(values)]
        ends[-1] = d_sae
    else:
        raise SpecError(
            f"matryoshka groups: {list(spec)} sum to {total:g}; "
            f"sizes must sum to d_sae = {d_sae}, fractions to 1"
        )
    kept = tuple(e for i, e in enumerate(ends) if e > (ends[i - 1] if i else 0))
    return kept


def _cumsum(values: list[float]) -> list[float]:
    out, acc = [], 0.0
    for v in values:
        acc += v
        out.append(acc)
    return out


@register_baseline
class MatryoshkaSAE(BatchTopKSAE):
    name = "matryoshka"
    config_class = MatryoshkaConfig
    sparsity_knob = "k"

    def __init__(self, cfg: MatryoshkaConfig):
        super().__init__(cfg)
        self.cfg: MatryoshkaConfig = cfg
        self.ends = group_ends(cfg.groups, cfg.d_sae)
        self.register_buffer("_ends", torch.tensor(self.ends, dtype=torch.long), persistent=False)

    def prefix_losses(self, batch: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Squared error (summed over dims, mean over tokens) of each prefix's
        reconstruction, with the graph; and the step's selection for the caller."""
        n = batch.shape[0]
        with torch.no_grad():
            pre = self.pre_acts(batch)  # ranks the latents; gradients come from the pairs
            rows, cols = self.select(pre)
            group = torch.bucketize(cols, self._ends.to(cols.device), right=True)
        kept = selected_preacts(pre, batch, self.b_dec, self.W_enc, self.b_enc, rows, cols)
        vals = torch.relu(kept)
        losses: list[torch.Tensor] = []
        x_hat: torch.Tensor | None = None
        for g in range(len(self.ends)):
            m = group == g if len(self.ends) > 1 else slice(None)
            # Boolean masks keep the pairs' order, so rows stay grouped by token.
            part = sparse_decode(rows[m], cols[m], vals[m], self.W_dec, n)
            x_hat = part + self.b_dec if x_hat is None else x_hat + part
            losses.append((x_hat - batch).pow(2).sum(-1).mean())
        assert x_hat is not None
        return losses, {"pre": pre, "cols": cols, "vals": vals, "x_hat": x_hat}

    def loss(self, batch: torch.Tensor, step: int) -> LossOutput:
        n = batch.shape[0]
        losses, sel = self.prefix_losses(batch)
        cols, vals = sel["cols"], sel["vals"]
        with torch.no_grad():
            fired = self.observe(cols, vals, n) if self.training else self.fired_latents(cols, vals)
        dead = self.dead_mask()
        aux = sparse_auxk_loss(sel["pre"], batch, batch - sel["x_hat"], dead, self.k_aux, self)
        total = losses[0]
        for term in losses[1:]:
            total = total + term
        if bool(dead.any()):
            total = total + self.cfg.aux_coefficient * data_variance(batch) * aux
        terms = {"mse": losses[-1].detach(), "auxk": aux.detach()}
        if len(losses) > 1:
            terms["prefix_mse_sum"] = sum(t.detach() for t in losses[:-1])
        return LossOutput(total, terms, fired=fired)

    def saelens_export(self) -> SAELensExport:
        """SAELens saves trained Matryoshka BatchTopK SAEs as JumpReLU SAEs; at inference
        this SAE is pre * 1[pre > t] with one threshold t >= 0, i.e. JumpReLU with every
        latent's threshold t (as bench/io/saelens.py exports batchtopk)."""
        return BatchTopKSAE.saelens_export(self)
