"""Probes shared by sparse_probing and absorption: top-k latent selection by class-mean
difference and a standardised logistic regression (scikit-learn, lbfgs).

Standardising before the fit makes the probe blind to each latent's scale, which differs
by orders of magnitude between SAE architectures; without it the L2 penalty would favour
latents that happen to be large.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np


@dataclass
class BinaryTask:
    """One balanced binary probing task: which examples, their 0/1 label, and the split."""

    name: str
    train: np.ndarray  # example indices
    test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    n_documents: int


def _balanced(idx: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Subsample the larger class to the smaller one's size (sorted, so order is fixed)."""
    pos, neg = idx[y == 1], idx[y == 0]
    n = min(len(pos), len(neg))
    pick = np.concatenate([rng.permutation(pos)[:n], rng.permutation(neg)[:n]])
    return np.sort(pick)


def binary_tasks(
    name: str,
    labels: list[str],
    is_test: np.ndarray,
    docs: np.ndarray,
    seed: int,
    min_test: int,
) -> tuple[list[BinaryTask], list[str]]:
    """One task for two classes, one-vs-rest per class for more; with the skip messages of
    tasks whose balanced held-out split has fewer than ``min_test`` examples per class."""
    classes = sorted(set(labels))
    lab = np.asarray(labels)
    targets = classes[1:] if len(classes) == 2 else classes
    tasks, skipped = [], []
    for c in targets:
        y = (lab == c).astype(np.int64)
        tname = f"{name}/{c}" if len(classes) > 2 else name
        rng = np.random.default_rng([seed, len(tasks), len(skipped)])
        idx = np.arange(len(lab))
        tr = _balanced(idx[~is_test], y[~is_test], rng)
        te = _balanced(idx[is_test], y[is_test], rng)
        if len(te) < 2 * min_test or len(tr) < 2 * min_test:
            skipped.append(
                f"{tname}: skipped, the balanced split has {len(tr) // 2} train and "
                f"{len(te) // 2} test examples per class (needs {min_test})"
            )
            continue
        n_docs = len(set(docs[np.concatenate([tr, te])].tolist()))
        tasks.append(BinaryTask(tname, tr, te, y[tr], y[te], n_docs))
    return tasks, skipped


def top_k_latents(x: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The k columns whose class means differ most (|mean_1 - mean_0|), float64 means;
    ties go to the lower index so the choice is deterministic."""
    x64 = x.astype(np.float64, copy=False)
    diff = np.abs(x64[y == 1].mean(0) - x64[y == 0].mean(0))
    order = np.lexsort((np.arange(len(diff)), -diff))
    return np.sort(order[: min(k, len(diff))])


def fit_predict(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, seed: int
) -> np.ndarray:
    """Standardised L2 logistic regression; predicted labels on ``x_test``."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    mu = x_train.astype(np.float64).mean(0)
    sd = x_train.astype(np.float64).std(0)
    sd[sd == 0] = 1.0
    clf = LogisticRegression(C=1.0, max_iter=1000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit((x_train - mu) / sd, y_train)
    return clf.predict((x_test - mu) / sd)


def probe_accuracy(
    x: np.ndarray, task: BinaryTask, k: int | None, seed: int
) -> tuple[float, list[int]]:
    """Test accuracy of a probe on the top-k columns of ``x`` (all columns when k is None),
    with the chosen columns."""
    cols = np.arange(x.shape[1]) if k is None else top_k_latents(x[task.train], task.y_train, k)
    pred = fit_predict(x[task.train][:, cols], task.y_train, x[task.test][:, cols], seed)
    return float((pred == task.y_test).mean()), cols.tolist()


def f1_score(pred: np.ndarray, y: np.ndarray) -> float:
    tp = float(((pred == 1) & (y == 1)).sum())
    denom = float((pred == 1).sum() + (y == 1).sum())
    return 0.0 if denom == 0 else 2.0 * tp / denom
