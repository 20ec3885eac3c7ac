"""Ground-truth metrics as SynthSAEBench (Chanin and Garriga-Alonso 2026) defines them, so
``feature_recovery`` numbers can be set beside the published ones.

With decoder rows w_j (j < M) and true feature directions d_i (i < N), let
A_ji = |cos(w_j, d_i)| (absolute cosine, both vectors normalised; a zero row has
cosine 0 with everything).

- ``mcc``: the one-to-one matching of latents to true features that maximises the
  sum of A (Hungarian algorithm on the rectangular [M, N] matrix: min(M, N) pairs),
  then the mean of A over the matched pairs. 1 means every latent is exactly a
  distinct true feature (or every true feature is a latent, when M > N).
- ``uniqueness``: each latent's best true feature i*(j) = argmax_i A_ji; the number
  of distinct i*(j) over all M latents, divided by M.
- per-latent ``precision``, ``recall`` and ``f1``: latent j, read as a detector of
  i*(j), fires when f_j != 0; the truth is c_i*(j) > 0. Over the evaluation tokens,
  precision_j = TP / (TP + FP), recall_j = TP / (TP + FN), F1_j their harmonic mean,
  each 0 where its denominator is 0 (a latent that never fires has precision 0),
  then each is averaged over ALL M latents.

These differ from the rest of ``feature_recovery`` on purpose: absolute rather than
signed cosines, and averages over latents rather than over true features.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

EPS = 1e-12


def abs_cosines(features: np.ndarray | torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """[M, N] float64 absolute cosines between decoder rows and true features."""
    w = w_dec.detach().double().cpu()
    d = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(EPS)
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return (w @ d.T).abs()


def mcc(abs_cos: torch.Tensor) -> float:
    """Mean |cos| over the optimal one-to-one matching (module docstring)."""
    a = abs_cos.numpy()
    rows, cols = linear_sum_assignment(a, maximize=True)
    return float(a[rows, cols].mean()) if len(rows) else 0.0


def best_features(abs_cos: torch.Tensor) -> torch.Tensor:
    """Each latent's best-matching true feature, argmax_i |cos|: [M] long."""
    return abs_cos.argmax(dim=1)


def uniqueness(abs_cos: torch.Tensor) -> float:
    """Distinct best-matching true features over the number of latents."""
    m = abs_cos.shape[0]
    return float(best_features(abs_cos).unique().numel() / m) if m else 0.0


class LatentDetection:
    """Running TP/FP/FN counts of each latent as a detector of its best true feature."""

    def __init__(self, best: torch.Tensor):
        self.best = best.long().cpu()
        m = self.best.numel()
        self.tp, self.fp, self.fn = (torch.zeros(m, dtype=torch.float64) for _ in range(3))

    def add(self, latents: torch.Tensor, coefs: torch.Tensor) -> None:
        """``latents`` [b, M] (the SAE's f), ``coefs`` [b, N] (true coefficients)."""
        fires = latents.detach().cpu() != 0
        truth = coefs.cpu()[:, self.best] > 0
        self.tp += (fires & truth).sum(0)
        self.fp += (fires & ~truth).sum(0)
        self.fn += (~fires & truth).sum(0)

    def scores(self) -> dict[str, float]:
        """Mean over latents of precision, recall and F1 (0 where undefined)."""
        if self.best.numel() == 0:
            return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
        p = _ratio(self.tp, self.tp + self.fp)
        r = _ratio(self.tp, self.tp + self.fn)
        f1 = _ratio(2 * p * r, p + r)
        return {"precision": float(p.mean()), "recall": float(r.mean()), "f1": float(f1.mean())}


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(EPS), torch.zeros_like(num))
