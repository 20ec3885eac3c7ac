"""End-to-end SAE with downstream reconstruction (Braun et al. 2024, "e2e+ds").

Adds to e2e's objective the MSE between the residual stream after every later layer
with and without the SAE, so the SAE's output stays on the model's own activation
path instead of exploiting directions later layers ignore or amplify oddly:
    loss = kl_coeff * KL + phi * ||f||_1 / d_in + ds_coeff / L * sum_l MSE_l.
Paper GPT-2 defaults: kl 0.5, downstream 2.5 in total over the later layers, phi 1.5.

Units differ from the paper's code, so those numbers are a starting point, not an
equivalence: f and phi act on activations scaled to E||x||^2 = d_in (dictbench's
training units), and each MSE_l is taken on residuals scaled by the same factor. The
later layers include the last block's output (the paper's formula; the released
e2e_sae configs list resid_pre of the later blocks only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dictbench.baselines.base import LossOutput, SAELensExport
from dictbench.baselines.e2e import E2ESAE, E2EConfig
from dictbench.registry import register_baseline
from dictbench.score.divergence import kl_clean_to_sae


@dataclass
class E2EDSConfig(E2EConfig):
    kl_coefficient: float = 0.5
    downstream_coefficient: float = 2.5


@register_baseline
class E2EDSSAE(E2ESAE):
    name = "e2e_ds"
    # Checked: the loss is a mean over tokens, so a batch split across processes trains
    # exactly as one (bench/train/distributed.py). Not inherited: a subclass checks it again.
    data_parallel_exact = True
    config_class = E2EDSConfig
    clean_residuals = True  # its loss compares residual streams: the shared pass keeps them

    def saelens_export(self) -> SAELensExport:
        """At inference this is e2e's SAE (only the training loss differs)."""
        return E2ESAE.saelens_export(self)

    def loss(self, batch, step: int) -> LossOutput:
        spliced, f = self.splice(batch.acts, batch.keep)
        with torch.no_grad():
            logits, clean_resid = self.downstream.clean(batch, residuals=True)
            lp_clean = torch.log_softmax(logits, -1)
        logits, sae_resid = self.downstream.logits_and_residuals(spliced, batch.token_ids)
        lp_sae = torch.log_softmax(logits, -1)
        kl = kl_clean_to_sae(lp_clean[:, 1:], lp_sae[:, 1:])
        keep = batch.keep
        # Residuals are in raw units; scale them like the inputs so the coefficient means
        # the same thing at every hook point and model.
        s = self.downstream.scale
        mses = [
            ((a[:, keep] - b[:, keep]) * s).pow(2).mean()
            for a, b in zip(sae_resid, clean_resid, strict=True)
        ]
        ds = torch.stack(mses).mean() if mses else kl.new_zeros(())
        l1, penalty = self.sparsity(f, step)
        cfg = self.cfg
        total = cfg.kl_coefficient * kl + penalty + cfg.downstream_coefficient * ds
        terms = {"kl": kl.detach(), "l1": l1.detach(), "downstream_mse": ds.detach()}
        return LossOutput(total, terms, f.detach().reshape(-1, f.shape[-1]))
