"""Synthetic sparse activations shared by the baselines' short training tests: sparse
non-negative combinations of fixed random unit directions, with an outlier at the
special position 0 that the trainer must skip."""

from __future__ import annotations

import numpy as np
import torch

from dictbench.data.cache import ActivationStore

D, M, ACTIVE, CTX = 64, 128, 5, 33


def sparse_data(n: int, seed: int) -> np.ndarray:
    """Sparse non-negative combinations of M fixed random unit directions, ACTIVE per row."""
    dirs = np.random.default_rng(1234).normal(size=(M, D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    codes = np.zeros((n, M))
    idx = np.argsort(rng.random((n, M)), axis=1)[:, :ACTIVE]
    np.put_along_axis(codes, idx, rng.uniform(0.5, 1.5, size=(n, ACTIVE)), axis=1)
    return (codes @ dirs).astype(np.float32)


def sparse_store(tmp_path, n_tokens: int) -> ActivationStore:
    n_win = -(-n_tokens // (CTX - 1))
    acts = sparse_data(n_win * CTX, seed=0).reshape(n_win, CTX, D)
    acts[:, 0] = 1e4  # the special position: training on it would wreck everything
    tokens = np.zeros((n_win, CTX), np.int32)
    return ActivationStore(tmp_path, acts, tokens, np.zeros(D, np.float32), {})


def explained_variance_and_l0(sae, x: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae.decode(f)
    fvu = (x - x_hat).double().pow(2).sum() / (x - x.mean(0)).double().pow(2).sum()
    return 1 - float(fvu), float((f != 0).double().sum(-1).mean())
