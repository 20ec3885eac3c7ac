"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

pre = (x - b_dec) W_enc + b_enc, z = ReLU(TopK_k(pre)), x_hat = z W_dec + b_dec.
Sparsity is set directly by k (exactly k candidates per token; the ReLU may zero
some), so the loss is reconstruction only, plus AuxK (baselines/auxk.py) to revive
latents that stopped firing. Decoder rows are kept at unit norm as in the paper;
with no penalty on z this is not needed against penalty-dodging, but it fixes the
scale of each latent so activations are comparable across latents.

Training uses the sparse kernels of baselines/sparse_ops.py: after the one dense
matmul that ranks the latents, the decoder and every gradient touch only the kept
(token, latent) pairs, so a step at fixed k grows far slower than d_sae. ``encode``
and ``decode`` stay dense: they are the reference the sparse path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dictbench.baselines.auxk import data_variance, sparse_auxk_loss
from dictbench.baselines.base import (
    Baseline,
    BaselineConfig,
    LossOutput,
    SAELensExport,
    UnitNormDecoder,
    fold_biases,
    saelens_export_as,
)
from dictbench.baselines.init import (
    geometric_median,
    tied_init,
)
from dictbench.baselines.sparse_ops import selected_preacts, sparse_decode
from dictbench.registry import register_baseline
from dictbench.train.distributed import any_across, rows_across


@dataclass
class TopKConfig(BaselineConfig):
    """Paper defaults. ``lr`` None uses the run's rate; the paper tunes Adam's rate by
    size (dictionary_learning: 2e-4 / sqrt(d_sae / 2**14))."""

    # Latents kept per token (the paper's headline SAEs use k = 32).
    k: int = 32
    # Dead latents used by AuxK per token; None means d_in // 2 (paper: "typically d_in/2"
    # or 512), capped by the number of dead latents.
    k_aux: int | None = None
    aux_coefficient: float = 1 / 32
    # A latent is dead after firing on none of this many consecutive training tokens
    # (paper: 10M). Budgets smaller than this never trigger AuxK unless a run lowers it.
    dead_tokens_threshold: int = 10_000_000


@register_baseline
class TopKSAE(UnitNormDecoder, Baseline):
    name = "topk"
    config_class = TopKConfig
    sparsity_knob = "k"
    # Checked: the loss is a mean over tokens, so a batch split across processes trains
    # exactly as one (bench/train/distributed.py). Not inherited: a subclass checks it again.
    data_parallel_exact = True

    def saelens_export(self) -> SAELensExport:
        """At inference this is SAELens's TopK SAE with the same k."""
        return saelens_export_as("topk", self, {"k": int(self.cfg.k)})

    def __init__(self, cfg: TopKConfig):
        super().__init__(cfg)
        self.cfg: TopKConfig = cfg
        self.W_dec, self.W_enc, self.b_enc, self.b_dec = tied_init(cfg.d_in, cfg.d_sae)
        # Training tokens since each latent last fired; a buffer so it survives state_dict.
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long))

    # --- the model -----------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def sparsify(self, pre: torch.Tensor) -> torch.Tensor:
        """Keep each token's k largest pre-activations, then ReLU."""
        vals, idx = pre.topk(min(self.cfg.k, pre.shape[-1]), dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))

    def select(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (token, latent) pairs ``sparsify`` keeps, flat and grouped by token."""
        k = min(self.cfg.k, pre.shape[-1])
        idx = pre.topk(k, dim=-1).indices
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
        return rows, idx.reshape(-1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sparsify(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    # --- training --------------------------------------------------------------------
    @property
    def k_aux(self) -> int:
        return self.cfg.k_aux if self.cfg.k_aux is not None else self.cfg.d_in // 2

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired > self.cfg.dead_tokens_threshold

    def observe(self, cols: torch.Tensor, vals: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Training-time bookkeeping (tokens since each latent last fired) from the kept
        (token, latent) pairs' latents and values; returns which latents fired here.
        From the pairs, not a dense [n_tokens, d_sae] matrix: at d_sae 36,864 building
        and scanning that matrix was a fifth of the step."""
        fired = self.fired_latents(cols, vals)
        # Over the global batch when it is split across processes (bench/train/distributed.py),
        # so every rank holds the same counts and AuxK picks the same dead latents.
        self.tokens_since_fired += rows_across(n_tokens)
        self.tokens_since_fired.masked_fill_(any_across(fired), 0)
        return fired

    def fired_latents(self, cols: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """Which latents fired (bool [d_sae]) among the kept pairs."""
        fired = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=cols.device)
        fired[cols[vals > 0]] = True
        return fired

    def loss(self, batch: torch.Tensor, step: int) -> LossOutput:
        n = batch.shape[0]
        with torch.no_grad():
            pre = self.pre_acts(batch)  # ranks the latents; gradients come from the pairs
            rows, cols = self.select(pre)
        kept = selected_preacts(pre, batch, self.b_dec, self.W_enc, self.b_enc, rows, cols)
        vals = torch.relu(kept)
        x_hat = sparse_decode(rows, cols, vals, self.W_dec, n) + self.b_dec
        mse = (x_hat - batch).pow(2).sum(-1).mean()
        with torch.no_grad():
            fired = self.observe(cols, vals, n) if self.training else self.fired_latents(cols, vals)
        # A latent firing in this batch is not dead (the counts above include it).
        dead = self.dead_mask()
        aux = sparse_auxk_loss(pre, batch, batch - x_hat, dead, self.k_aux, self)
        total = mse
        if bool(dead.any()):
            # aux_coefficient is the paper's weight against a variance-normalised MSE
            # (baselines/auxk.py); data_variance puts it in this plain MSE's units.
            total = mse + self.cfg.aux_coefficient * data_variance(batch) * aux
        terms = {"mse": mse.detach(), "auxk": aux.detach()}
        return LossOutput(total, terms, fired=fired)

    def on_train_start(self, total_steps: int, sample: torch.Tensor) -> None:
        super().on_train_start(total_steps, sample)
        with torch.no_grad():
            self.b_dec.copy_(geometric_median(sample))

    def fold_input_scale(self, scale: float) -> None:
        # pre(s x) = s * pre_folded(x) once both biases are divided by s; TopK's choice
        # is unchanged by a positive factor and ReLU is positively homogeneous.
        fold_biases(self, scale, "b_enc", "b_dec")
