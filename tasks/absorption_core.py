"""The feature-absorption measurement (Chanin et al. 2024, as SAEBench computes it), on
activations at word tokens whose first letter is known.

Kept apart from the prompts and the model so the closed-form tests can hand it
constructed activations and a constructed SAE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dictbench.tasks import probe_fit as pf

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass
class AbsorptionParams:
    max_k: int = 10  # largest main-latent set tried by k-sparse probing
    split_threshold: float = 0.03  # F1 gain that makes one more latent a feature split
    cos_threshold: float = 0.025  # decoder/probe cosine for a latent to count as aligned
    full_fraction: float = 0.4  # absorber projection / probe projection for full absorption


@dataclass
class GroundTruth:
    """The 26-way probe: unit directions in activation space and its test accuracy."""

    directions: np.ndarray  # [n_classes, d]
    classes: np.ndarray  # letter index of each row
    accuracy: float
    predicted: np.ndarray  # predicted letter index per example
    extras: dict[str, Any] = field(default_factory=dict)


def fit_ground_truth(x: np.ndarray, y: np.ndarray, is_test: np.ndarray, seed: int) -> GroundTruth:
    """Multinomial logistic regression on standardised activations; the weights are
    mapped back to raw activation space (w / sd) so they can be compared with decoder rows."""
    from sklearn.linear_model import LogisticRegression

    x64 = x.astype(np.float64)
    mu, sd = x64[~is_test].mean(0), x64[~is_test].std(0)
    sd[sd == 0] = 1.0
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    clf.fit((x64[~is_test] - mu) / sd, y[~is_test])
    pred = clf.predict((x64 - mu) / sd)
    w = clf.coef_ / sd
    if w.shape[0] == 1:  # two classes: sklearn keeps one row
        w = np.concatenate([-w, w])
    w = w / np.linalg.norm(w, axis=1, keepdims=True).clip(1e-12)
    acc = float((pred[is_test] == y[is_test]).mean())
    return GroundTruth(w.astype(np.float32), clf.classes_, acc, pred)


def main_latents(
    f: np.ndarray, y_bin: np.ndarray, is_test: np.ndarray, params: AbsorptionParams, seed: int
) -> tuple[list[int], list[float]]:
    """k-sparse probing for one letter: the latents firing most more on it (signed class-mean
    difference), grown while one more latent raises test F1 by more than the split threshold."""
    tr, te = ~is_test, is_test
    f64 = f[tr].astype(np.float64)
    diff = f64[y_bin[tr] == 1].mean(0) - f64[y_bin[tr] == 0].mean(0)
    order = np.lexsort((np.arange(len(diff)), -diff))
    f1s: list[float] = []
    chosen = 1
    for k in range(1, params.max_k + 1):
        cols = order[:k]
        pred = pf.fit_predict(f[tr][:, cols], y_bin[tr], f[te][:, cols], seed)
        f1s.append(pf.f1_score(pred, y_bin[te]))
        if k > 1 and f1s[-1] - f1s[-2] <= params.split_threshold:
            break
        chosen = k
    return sorted(order[:chosen].tolist()), f1s


def word_absorption(
    f_row: np.ndarray, x_proj: float, contrib: np.ndarray, aligned: np.ndarray, main: list[int]
) -> tuple[bool, bool, float]:
    """(absorbed, fully absorbed, absorption fraction) for one word.

    ``contrib`` is each latent's share of the reconstruction along the probe direction
    (activation x decoder row . direction); ``aligned`` marks latents whose decoder row
    points along the direction. Absorbed: no main latent fires while an aligned latent
    adds to the direction. Full: absorbed, and the largest such latent alone carries at
    least ``x_proj`` (the full-absorption share of the input's probe projection).
    Fraction: the share of the reconstruction's signed projection that the main latents
    do not account for, clipped to [0, 1] (0 when the projection is not positive).
    """
    is_main = np.zeros(len(f_row), dtype=bool)
    is_main[main] = True
    main_fires = bool((f_row[is_main] > 0).any())
    absorbers = aligned & ~is_main & (f_row > 0) & (contrib > 0)
    absorbed = (not main_fires) and bool(absorbers.any())
    top = float(contrib[absorbers].max()) if absorbers.any() else 0.0
    full = absorbed and x_proj > 0 and top >= x_proj
    total = float(contrib.astype(np.float64).sum())
    main_part = float(contrib[is_main].astype(np.float64).sum())
    frac = min(1.0, max(0.0, (total - main_part) / total)) if total > 0 else 0.0
    return absorbed, full, frac


@dataclass(frozen=True)
class WordSet:
    """The spelling words as the task sees them: hook activations at each word's token
    ``x`` [n, d], its first-letter index ``y`` and the held-out mask. One object because
    the probe, the main-latent search and the measurement all read the three together."""

    x: np.ndarray
    y: np.ndarray
    is_test: np.ndarray


@torch.no_grad()
def measure(
    sae: torch.nn.Module,
    words: WordSet,
    truth: GroundTruth,
    params: AbsorptionParams,
    seed: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """Per-letter absorption over held-out words the ground-truth probe gets right."""
    x, y, is_test = words.x, words.y, words.is_test
    f = sae.encode(torch.from_numpy(x).to(device)).float().cpu().numpy()
    w_dec = sae.W_dec.detach().float().cpu().numpy()
    dec_unit = w_dec / np.linalg.norm(w_dec, axis=1, keepdims=True).clip(1e-12)
    per_letter: dict[str, dict[str, Any]] = {}
    for row, cls in enumerate(truth.classes):
        u = truth.directions[row]
        y_bin = (y == cls).astype(np.int64)
        main, f1s = main_latents(f, y_bin, is_test, params, seed)
        cos = dec_unit @ u
        aligned = cos >= params.cos_threshold
        words = np.flatnonzero(is_test & (y == cls) & (truth.predicted == cls))
        if len(words) == 0:
            continue
        res = []
        along = w_dec @ u
        for i in words:
            contrib = f[i] * along
            x_proj = params.full_fraction * float(x[i].astype(np.float64) @ u)
            res.append(word_absorption(f[i], x_proj, contrib, aligned, main))
        arr = np.asarray(res, dtype=np.float64)
        per_letter[LETTERS[int(cls)]] = {
            "n_words": len(words),
            "main_latents": main,
            "f1_by_k": f1s,
            "absorption_rate": float(arr[:, 0].mean()),
            "full_absorption_rate": float(arr[:, 1].mean()),
            "mean_absorption_fraction": float(arr[:, 2].mean()),
        }
    return per_letter


def summarise(per_letter: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Means over letters (each letter weighs the same, as in SAEBench)."""
    keys = ("absorption_rate", "full_absorption_rate", "mean_absorption_fraction")
    if not per_letter:
        return {k: float("nan") for k in keys} | {"n_letters": 0.0, "mean_main_latents": 0.0}
    out = {k: float(np.mean([v[k] for v in per_letter.values()])) for k in keys}
    out["n_letters"] = float(len(per_letter))
    out["mean_main_latents"] = float(np.mean([len(v["main_latents"]) for v in per_letter.values()]))
    return out
