"""AuxK (Gao et al. 2024, section A.2), shared by the TopK family.

Latents that have not fired for a long stretch of training tokens are "dead". AuxK
asks the top ``k_aux`` of them, per token, to reconstruct what the live latents
missed, so they get a gradient again and can come back. Two details differ from
SAELens on purpose: the residual is reconstructed WITHOUT ``b_dec`` (the target is
a difference of two reconstructions, both of which already contain it), and the
loss is normalised by the residual's variance over the batch.

Its weight (1/32) is relative to a reconstruction loss normalised by the data's
variance, as in OpenAI's training code. dictbench's reconstruction term is the plain
squared error, so the TopK family adds ``aux_coefficient * data_variance(x) * aux``:
the same balance as the paper's. Without that factor AuxK's weight was off by the
factor E||x - mean(x)||^2 (training inputs have E||x||^2 = d_in, so a factor of up to
d_in too small).
"""

from __future__ import annotations

import torch

from dictbench.baselines.sparse_ops import selected_preacts, sparse_decode
from dictbench.train.distributed import mean_rows_across, rows_across, sum_across


def auxk_loss(
    pre: torch.Tensor,
    residual: torch.Tensor,
    dead: torch.Tensor,
    k_aux: int,
    W_dec: torch.Tensor,
) -> torch.Tensor:
    """``||e - e_hat||^2 / ||e - mean(e)||^2`` (sums over dims, means over the batch).

    ``pre`` [B, d_sae]: encoder pre-activations (with their graph); ``residual`` [B, d_in]:
    ``x - x_hat``, used as a fixed target; ``dead`` [d_sae] bool. ``e_hat`` decodes the
    ReLU of the top ``min(k_aux, #dead)`` dead pre-activations per token with ``W_dec``
    only. Zero (no graph) when nothing is dead, and zero when the residual does not vary
    over the batch (a one-token batch), where the normalisation is undefined.
    """
    k = min(int(k_aux), int(dead.sum()))
    if k <= 0:
        return pre.new_zeros(())
    e = residual.detach()
    vals, idx = pre.masked_fill(~dead, float("-inf")).topk(k, dim=-1)
    z_aux = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    e_hat = z_aux @ W_dec
    num = (e - e_hat).pow(2).sum(-1).mean()
    den = (e - e.mean(0)).pow(2).sum(-1).mean()
    return _normalised(num, den)


def _residual_variance(e: torch.Tensor) -> torch.Tensor:
    """``mean ||e - mean(e)||^2`` over the GLOBAL batch when it is split across processes
    (a batch statistic: each shard's own would change the loss); no graph."""
    if rows_across(e.shape[0]) == e.shape[0]:  # one process: the batch is all there is
        return (e - e.mean(0)).pow(2).sum(-1).mean()
    mu = mean_rows_across(e)
    return sum_across((e - mu).pow(2).sum()) / rows_across(e.shape[0])


def data_variance(x: torch.Tensor) -> torch.Tensor:
    """``E||x - mean(x)||^2`` over the global batch, no graph: the factor that turns
    AuxK's paper weight into the units of a plain squared-error reconstruction term."""
    return _residual_variance(x.detach())


def _normalised(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0 * num)


def sparse_auxk_loss(
    pre: torch.Tensor,
    x: torch.Tensor,
    residual: torch.Tensor,
    dead: torch.Tensor,
    k_aux: int,
    sae: torch.nn.Module,
) -> torch.Tensor:
    """``auxk_loss`` computed from the chosen dead pairs only (baselines/sparse_ops.py).

    ``pre`` here has no graph: gradients reach ``sae``'s ``W_enc``, ``b_enc``, ``b_dec``
    and ``W_dec`` through the selected pairs, exactly where the dense version sends them.
    """
    k = min(int(k_aux), int(dead.sum()))
    if k <= 0:
        return pre.new_zeros(())
    e = residual.detach()
    n = pre.shape[0]
    with torch.no_grad():
        cols = pre.masked_fill(~dead, float("-inf")).topk(k, dim=-1).indices.reshape(-1)
    rows = torch.arange(n, device=pre.device).repeat_interleave(k)
    vals = torch.relu(selected_preacts(pre, x, sae.b_dec, sae.W_enc, sae.b_enc, rows, cols))
    e_hat = sparse_decode(rows, cols, vals, sae.W_dec, n)
    num = (e - e_hat).pow(2).sum(-1).mean()
    return _normalised(num, _residual_variance(e))
