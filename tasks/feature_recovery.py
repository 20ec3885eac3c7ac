"""Did the SAE find the true features? Scored against a synthetic run's answer key.

Only a synthetic run (``synthetic:`` in the spec, see ``dictbench.data.synthetic``) knows
the true unit directions d_i (i < N) and every eval token's true coefficients c_i.
Let w_j be the SAE's decoder rows (j < M) and cos_ij = <d_i, w_j> / ||w_j||.

- ``mmcs_true_to_learned`` = mean_i max_j cos_ij: is every true feature somewhere in
  the dictionary? ``mmcs_learned_to_true`` = mean_j max_i cos_ij: is every latent a
  true feature? (All M latents count, dead ones included.) Signed cosines: a latent
  that fires with non-negative activations writes +w_j, so -d_i is not d_i.
- ``frac_recovered`` = fraction of true features with max_j cos_ij >= 0.9 (the
  threshold is the task option ``cos_threshold``). Chance for random directions in
  d = 64 is below 1e-15.
- Each true feature's *matched latent* is j*(i) = argmax_j cos_ij. ``coef_corr`` is the
  mean over true features of the Pearson correlation, over eval tokens, between
  f_j*(x) and c_i (features that never fire in the window are left out; a latent
  that never fires scores 0). ``coef_corr_recovered`` is the same mean over recovered
  features only.
- ``coef_shrinkage``: the matched latent writes a_i = f_j* <w_j*, d_i> along d_i.
  Over recovered features and the tokens where both c_i > 0 and f_j* != 0,
  sum(a c) / sum(c^2), the least-squares slope of a on c: 1 is unbiased, below 1 the
  SAE shrinks the features it detects. Known coefficients make this exact, where
  ``relative_reconstruction_bias`` on real data can only see the whole of x_hat.
- ``detection_recall`` / ``detection_precision``: mean over recovered features of
  P(f_j* != 0 | c_i > 0) and P(c_i > 0 | f_j* != 0).

The details hold the data's own reference points (true L0, and the FVU floor that
the noise sets: no reconstruction of x from sparse features can do better on
average), per-feature values, and recovery by frequency quartile (feature i is the
i-th most frequent, so a method that only finds common features shows it there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dictbench.errors import SpecError
from dictbench.registry import register_task
from dictbench.score.metric_meta import Metric
from dictbench.tasks import synth_metrics
from dictbench.tasks.base import Task, TaskEnv, TaskResult, TaskSkipped

DEFAULT_COS_THRESHOLD = 0.9
EPS = 1e-12


def cosine_matrix(features: np.ndarray, w_dec: torch.Tensor) -> torch.Tensor:
    """[N, M] cosines between true unit features and decoder rows (0 for a zero row)."""
    w = w_dec.detach().double().cpu()
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return torch.from_numpy(np.asarray(features, dtype=np.float64)) @ w.T


def _pearson(
    n: float,
    sa: torch.Tensor,
    sc: torch.Tensor,
    saa: torch.Tensor,
    scc: torch.Tensor,
    sac: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature correlation from running sums; (corr, defined) where ``defined`` marks
    features with variance in c. A constant latent against a varying c scores 0."""
    cov = sac - sa * sc / n
    var_a = (saa - sa * sa / n).clamp_min(0)
    var_c = (scc - sc * sc / n).clamp_min(0)
    defined = var_c > EPS * n
    den = (var_a * var_c).sqrt()
    corr = torch.where(den > EPS * n, cov / den.clamp_min(EPS), torch.zeros_like(cov))
    return corr.clamp(-1.0, 1.0), defined


def _mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    return float(values[mask].mean()) if bool(mask.any()) else float("nan")


@dataclass(frozen=True)
class _Matching:
    """Each true feature's matched latent (best signed cosine), whether it counts as
    recovered, and how much of d_i the matched latent writes per unit of activation:
    what every per-token sum and metric is measured against, computed once per SAE."""

    cos: torch.Tensor  # [N, M]
    best_cos: torch.Tensor  # [N]
    match: torch.Tensor  # [N] latent index
    recovered: torch.Tensor  # [N] bool
    proj: torch.Tensor  # [N] <w_j*, d_i>

    @classmethod
    def of(cls, features: np.ndarray, w_dec: torch.Tensor, thr: float) -> _Matching:
        """The matching of the true unit ``features`` to the decoder rows ``w_dec``."""
        cos = cosine_matrix(features, w_dec)
        best_cos, match = cos.max(dim=1)
        w = w_dec.detach().double().cpu()
        feats = torch.from_numpy(np.asarray(features, dtype=np.float64))
        proj = (w[match] * feats).sum(-1)
        return cls(cos, best_cos, match, best_cos >= thr, proj)


class _RunningSums:
    """Per-feature float64 running sums over the eval tokens (and the data's own sums
    for its variance): kept apart from ``FeatureRecovery.run`` so the loop over tokens
    reads as one step and the metrics are read off the sums afterwards."""

    def __init__(self, matching: _Matching) -> None:
        self.matching = matching
        n_feat = matching.cos.shape[0]
        (
            self.sa,
            self.sc,
            self.saa,
            self.scc,
            self.sac,
            self.shrink_num,
            self.shrink_den,
            self.true_pos,
            self.fired_true,
            self.fired_latent,
        ) = (torch.zeros(n_feat, dtype=torch.float64) for _ in range(10))
        self.n = 0
        self.x_sum: torch.Tensor | None = None
        self.x_sq: torch.Tensor | None = None

    def add(self, f: torch.Tensor, c: torch.Tensor, x: torch.Tensor) -> None:
        """One batch: latent codes ``f``, true coefficients ``c``, activations ``x``."""
        a = f[:, self.matching.match.to(x.device)].double().cpu()
        xd = x.double().cpu()
        self.n += x.shape[0]
        self.sa += a.sum(0)
        self.sc += c.sum(0)
        self.saa += (a * a).sum(0)
        self.scc += (c * c).sum(0)
        self.sac += (a * c).sum(0)
        on_c, on_a = c > 0, a != 0
        both = on_c & on_a
        amp = a * self.matching.proj
        self.shrink_num += torch.where(both, amp * c, 0.0).sum(0)
        self.shrink_den += torch.where(both, c * c, 0.0).sum(0)
        self.true_pos += both.sum(0)
        self.fired_true += on_c.sum(0)
        self.fired_latent += on_a.sum(0)
        self.x_sum = xd.sum(0) if self.x_sum is None else self.x_sum + xd.sum(0)
        self.x_sq = xd.pow(2).sum(0) if self.x_sq is None else self.x_sq + xd.pow(2).sum(0)

    def pearson(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(coef_corr per feature, defined) from the sums: both metrics and details use it."""
        return _pearson(float(self.n), self.sa, self.sc, self.saa, self.scc, self.sac)

    def recovery_metrics(self) -> dict[str, float]:
        """The metrics read off the matching and the sums (the module docstring's list),
        in the order the records hold them."""
        m = self.matching
        corr, defined = self.pearson()
        den = self.shrink_den[m.recovered].sum()
        shrinkage = float(self.shrink_num[m.recovered].sum() / den) if den > 0 else float("nan")
        recall = self.true_pos / self.fired_true.clamp_min(1)
        precision = self.true_pos / self.fired_latent.clamp_min(1)
        return {
            "mmcs_true_to_learned": float(m.best_cos.mean()),
            "mmcs_learned_to_true": float(m.cos.max(dim=0).values.mean()),
            "frac_recovered": float(m.recovered.double().mean()),
            "coef_corr": _mean(corr, defined),
            "coef_corr_recovered": _mean(corr, defined & m.recovered),
            "coef_shrinkage": shrinkage,
            "detection_recall": _mean(recall, m.recovered & (self.fired_true > 0)),
            "detection_precision": _mean(precision, m.recovered & (self.fired_latent > 0)),
        }

    def details(self, truth: Any, thr: float) -> dict[str, Any]:
        """The data's reference points (true L0, the noise's FVU floor), recovery by
        frequency quartile and the per-feature values."""
        m, n = self.matching, self.n
        corr, defined = self.pearson()
        assert self.x_sum is not None and self.x_sq is not None
        total_var = float((self.x_sq - self.x_sum.pow(2) / n).clamp_min(0).sum())
        d_in = np.asarray(truth.features).shape[1]
        return {
            "cos_threshold": thr,
            "n_features": int(m.cos.shape[0]),
            "d_sae": int(m.cos.shape[1]),
            "true_l0": float(self.fired_true.sum() / n),
            "noise_std": float(truth.noise_std),
            "fvu_noise_floor": n * d_in * truth.noise_std**2 / total_var if total_var else None,
            "recovered_by_frequency_quartile": [
                float(q.double().mean()) for q in torch.tensor_split(m.recovered, 4)
            ],
            "features": {
                "eval_frequency": (self.fired_true / n).tolist(),
                "max_cos": m.best_cos.tolist(),
                "matched_latent": m.match.tolist(),
                "coef_corr": [float(v) if d else None for v, d in zip(corr, defined, strict=True)],
            },
        }


@register_task
class FeatureRecovery(Task):
    name = "feature_recovery"
    needs_ground_truth = True
    report_order = 60
    # The fraction moves in steps of 1/n_features (1/128 in the preset), and a
    # rounding-level change to the data has moved it by 3 features: hence 0.03.
    metrics = (
        Metric("frac_recovered", "higher", abs_tol=0.03, headline=True),
        Metric("mmcs_true_to_learned", "higher", abs_tol=0.02, headline=True),
        Metric("mmcs_learned_to_true", "higher", abs_tol=0.02),
        Metric("coef_corr", "higher", abs_tol=0.02, headline=True),
        Metric("coef_corr_recovered", "higher", abs_tol=0.02),
        Metric("coef_shrinkage", "target1", abs_tol=0.02),
        Metric("detection_recall", "higher", abs_tol=0.02),
        Metric("detection_precision", "higher", abs_tol=0.02),
        # SynthSAEBench's definitions (tasks/synth_metrics.py), comparable with its tables.
        Metric("mcc", "higher", abs_tol=0.02, doc="SynthSAEBench MCC: matched mean |cos|"),
        Metric("uniqueness", "higher", abs_tol=0.02, doc="distinct best true features / latents"),
        Metric("latent_precision", "higher", abs_tol=0.02, doc="SynthSAEBench latent precision"),
        Metric("latent_recall", "higher", abs_tol=0.02, doc="SynthSAEBench per-latent recall"),
        Metric("latent_f1", "higher", abs_tol=0.02, doc="SynthSAEBench per-latent F1"),
    )

    @staticmethod
    def validate_options(raw: dict[str, Any]) -> None:
        """``cos_threshold`` in (0, 1] and ``max_tokens`` a positive integer; nothing else."""
        where = "task_options.feature_recovery"
        for key in raw:
            if key not in ("cos_threshold", "max_tokens"):
                raise SpecError(f"{where}.{key}: unknown option (known: cos_threshold, max_tokens)")
        thr = raw.get("cos_threshold", DEFAULT_COS_THRESHOLD)
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 < thr <= 1:
            raise SpecError(f"{where}.cos_threshold: must be a number in (0, 1], got {thr!r}")
        n = raw.get("max_tokens")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
            raise SpecError(f"{where}.max_tokens: must be a positive integer, got {n!r}")

    @torch.no_grad()
    def run(self, sae: torch.nn.Module, env: TaskEnv) -> TaskResult:
        truth = getattr(env, "ground_truth", None)
        if truth is None:
            raise TaskSkipped("needs a known dictionary; only a synthetic run has one")
        if not np.asarray(env.keep_positions).all():
            raise ValueError("feature_recovery: synthetic stores keep every position")
        opts = env.task_options(self.name)
        thr = float(opts.get("cos_threshold", DEFAULT_COS_THRESHOLD))
        matching = _Matching.of(truth.features, sae.W_dec, thr)
        feats = torch.from_numpy(np.asarray(truth.features, dtype=np.float64))
        abs_cos = synth_metrics.abs_cosines(feats, sae.W_dec)
        detection = synth_metrics.LatentDetection(synth_metrics.best_features(abs_cos))

        sums = _RunningSums(matching)
        coefs = truth.coefficients
        for x in env.iter_tokens(opts.get("max_tokens")):
            b = x.shape[0]
            if sums.n + b > coefs.n_tokens:
                raise ValueError("feature_recovery: more eval tokens than true coefficients")
            c = torch.from_numpy(coefs.dense(sums.n, sums.n + b)).double()
            f = sae.encode(x).detach()
            detection.add(f, c)
            sums.add(f, c, x)
        if sums.n == 0:
            raise ValueError("feature_recovery: no evaluation tokens")

        metrics = {
            **sums.recovery_metrics(),
            "mcc": synth_metrics.mcc(abs_cos),
            "uniqueness": synth_metrics.uniqueness(abs_cos),
            **{f"latent_{k}": v for k, v in detection.scores().items()},
        }
        return TaskResult(metrics, sums.details(truth, thr), eval_tokens=sums.n)
