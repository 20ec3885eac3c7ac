"""Synthetic activations with a known dictionary: a benchmark whose answer key exists.

Real activations have no ground truth, so no metric on them can say whether a
method found *the* features. Here every token is

    x = sum_i c_i d_i + noise,      c_i >= 0, most c_i = 0,

with N known unit directions d_i in d dimensions and N > d (superposition), and
the structure that makes real dictionary learning hard:

- power-law feature frequencies: P(c_i > 0) = min(max_freq, C (i + 1)^-alpha), with C
  chosen so that E[#active] = ``mean_active``; feature i is the i-th most frequent;
- correlated groups: members fire through a Gaussian copula with within-group
  correlation ``group_corr`` (so each member keeps its power-law frequency exactly,
  but members tend to fire together);
- anti-correlated groups: at most one member fires per token (one uniform draw per
  group picks which, if any), again with each member's frequency exact;
- magnitudes that vary: feature i has a scale s_i = exp(magnitude_spread * z_i)
  (z_i standard normal, fixed with the dictionary), and each firing draws
  c_i = s_i * U(1 - magnitude_jitter, 1 + magnitude_jitter);
- nearly parallel features: ``parallel_pairs`` disjoint pairs whose directions have
  cosine exactly ``parallel_cos``;
- additive isotropic Gaussian noise of standard deviation ``noise_std`` per dimension.

Groups and pairs use disjoint features, chosen by a seeded permutation. The
dictionary (directions, frequencies, scales, groups, pairs) depends only on the
spec and ``dictionary_seed``; the samples depend on the run seed and the split, so
train and eval tokens are independent draws from the same distribution.

The stores mimic an activation cache entry (``[n_windows, ctx, d]`` float32) but
live in memory and have no special position: every position counts, because no
position of a synthetic window is a BOS.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from dictbench.cache import ActivationStore
from dictbench.errors import SpecError

FORMAT = 1
# Tokens per window in the synthetic stores. Windows only exist because the trainer and
# the tasks read [n_windows, ctx, d] arrays; nothing about a synthetic token depends on it.
CTX = 128
# Tokens generated per chunk: bounds the dense [chunk, N] firing matrix in memory.
CHUNK = 8192
_PARTS = {"train": 1, "eval": 2}


@dataclass
class SyntheticSpec:
    """The ``synthetic:`` section of a run spec (see the module docstring for the model)."""

    d_in: int = 32
    n_features: int = 128
    mean_active: float = 3.0
    freq_exponent: float = 1.0
    max_freq: float = 0.2
    correlated_groups: int = 4
    anticorrelated_groups: int = 4
    group_size: int = 4
    group_corr: float = 0.8
    magnitude_spread: float = 0.3
    magnitude_jitter: float = 0.5
    parallel_pairs: int = 6
    parallel_cos: float = 0.8
    noise_std: float = 0.05
    dictionary_seed: int = 0

    def validate(self) -> None:
        """Strict checks with the field named, like the rest of the spec."""
        w = "synthetic"
        if self.d_in < 2:
            raise SpecError(f"{w}.d_in: must be at least 2, got {self.d_in}")
        if self.n_features < 1:
            raise SpecError(f"{w}.n_features: must be positive, got {self.n_features}")
        if not 0 < self.max_freq <= 1:
            raise SpecError(f"{w}.max_freq: must be in (0, 1], got {self.max_freq}")
        if not 0 < self.mean_active <= self.n_features * self.max_freq:
            raise SpecError(
                f"{w}.mean_active: must be in (0, n_features * max_freq = "
                f"{self.n_features * self.max_freq:g}], got {self.mean_active}"
            )
        nonneg = {
            "freq_exponent": self.freq_exponent,
            "correlated_groups": self.correlated_groups,
            "anticorrelated_groups": self.anticorrelated_groups,
            "parallel_pairs": self.parallel_pairs,
            "magnitude_spread": self.magnitude_spread,
            "noise_std": self.noise_std,
        }
        for name, value in nonneg.items():
            if value < 0:
                raise SpecError(f"{w}.{name}: must not be negative, got {value}")
        if self.group_size < 2:
            raise SpecError(f"{w}.group_size: must be at least 2, got {self.group_size}")
        if not 0 <= self.group_corr < 1:
            raise SpecError(f"{w}.group_corr: must be in [0, 1), got {self.group_corr}")
        if not 0 <= self.magnitude_jitter < 1:
            raise SpecError(f"{w}.magnitude_jitter: must be in [0, 1), got {self.magnitude_jitter}")
        if not -1 < self.parallel_cos < 1:
            raise SpecError(f"{w}.parallel_cos: must be in (-1, 1), got {self.parallel_cos}")
        used = 2 * self.parallel_pairs + self.group_size * (
            self.correlated_groups + self.anticorrelated_groups
        )
        if used > self.n_features:
            raise SpecError(
                f"{w}: groups and parallel pairs need {used} distinct features, "
                f"n_features is {self.n_features}"
            )

    def identity(self) -> dict[str, Any]:
        return {"synthetic": asdict(self), "format": FORMAT}


# --- the dictionary -------------------------------------------------------------------


@dataclass
class Dictionary:
    """Everything fixed by the spec and its dictionary seed."""

    features: np.ndarray  # [N, d] float32, unit rows
    freq: np.ndarray  # [N] float64, P(c_i > 0)
    scale: np.ndarray  # [N] float64, s_i
    correlated: list[list[int]] = field(default_factory=list)
    anticorrelated: list[list[int]] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)


def power_law_freqs(n: int, mean_active: float, exponent: float, cap: float) -> np.ndarray:
    """min(cap, C r^-alpha) with C found by bisection so the frequencies sum to
    ``mean_active`` (the sum is increasing in C, so the root is unique)."""
    base = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    lo, hi = 0.0, cap / base[-1]  # at hi every feature is capped: the sum is n * cap
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.minimum(cap, mid * base).sum() < mean_active:
            lo = mid
        else:
            hi = mid
    return np.minimum(cap, hi * base)


def make_dictionary(spec: SyntheticSpec) -> Dictionary:
    spec.validate()
    rng = np.random.default_rng([spec.dictionary_seed, 7919])
    n, d = spec.n_features, spec.d_in
    feats = rng.standard_normal((n, d))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    perm = [int(i) for i in rng.permutation(n)]
    pairs = [(perm[2 * k], perm[2 * k + 1]) for k in range(spec.parallel_pairs)]
    rest = perm[2 * spec.parallel_pairs :]
    g = spec.group_size
    groups = [
        rest[k * g : (k + 1) * g]
        for k in range(spec.correlated_groups + spec.anticorrelated_groups)
    ]
    for a, b in pairs:
        # b = cos * a + sin * u with u a unit vector orthogonal to a: cos(a, b) is exact.
        u = rng.standard_normal(d)
        u -= (u @ feats[a]) * feats[a]
        u /= np.linalg.norm(u)
        sin = math.sqrt(1 - spec.parallel_cos**2)
        feats[b] = spec.parallel_cos * feats[a] + sin * u
        feats[b] /= np.linalg.norm(feats[b])
    freq = power_law_freqs(n, spec.mean_active, spec.freq_exponent, spec.max_freq)
    scale = np.exp(spec.magnitude_spread * rng.standard_normal(n))
    anti = groups[spec.correlated_groups :]
    for k, members in enumerate(anti):
        if freq[members].sum() > 1:
            raise SpecError(
                f"synthetic.anticorrelated_groups: group {k}'s members fire with total "
                f"probability {freq[members].sum():.3g} > 1, so they cannot be exclusive; "
                "lower max_freq or group_size"
            )
    return Dictionary(
        features=feats.astype(np.float32),
        freq=freq,
        scale=scale,
        correlated=groups[: spec.correlated_groups],
        anticorrelated=anti,
        pairs=pairs,
    )


# --- sampling -------------------------------------------------------------------------


class _Sampler:
    """Precomputed index arrays so one chunk of tokens is a handful of vectorised draws."""

    def __init__(self, spec: SyntheticSpec, dic: Dictionary):
        self.spec, self.dic = spec, dic
        n = spec.n_features
        corr = [i for grp in dic.correlated for i in grp]
        anti = [i for grp in dic.anticorrelated for i in grp]
        grouped = set(corr) | set(anti)
        self.indep = np.array([i for i in range(n) if i not in grouped], dtype=np.int64)
        self.corr = np.array(corr, dtype=np.int64)
        self.corr_group = np.repeat(np.arange(len(dic.correlated)), spec.group_size)
        # Fire iff z > Phi^-1(1 - p): z is standard normal, so P(fire) = p exactly.
        self.corr_thr = np.array([NormalDist().inv_cdf(1 - dic.freq[i]) for i in corr])
        self.anti = np.array(anti, dtype=np.int64)
        self.anti_group = np.repeat(np.arange(len(dic.anticorrelated)), spec.group_size)
        # Member k of a group owns [lo_k, hi_k) of one uniform draw: exclusive, P = p_k.
        hi = np.concatenate([np.cumsum(dic.freq[grp]) for grp in dic.anticorrelated] or [[]])
        self.anti_hi = hi
        self.anti_lo = hi - dic.freq[self.anti] if len(anti) else hi

    def fire(self, rng: np.random.Generator, t: int) -> np.ndarray:
        fire = np.zeros((t, self.spec.n_features), dtype=bool)
        fire[:, self.indep] = rng.random((t, len(self.indep))) < self.dic.freq[self.indep]
        if len(self.corr):
            rho = self.spec.group_corr
            shared = rng.standard_normal((t, len(self.dic.correlated)))
            own = rng.standard_normal((t, len(self.corr)))
            z = math.sqrt(rho) * shared[:, self.corr_group] + math.sqrt(1 - rho) * own
            fire[:, self.corr] = z > self.corr_thr
        if len(self.anti):
            u = rng.random((t, len(self.dic.anticorrelated)))[:, self.anti_group]
            fire[:, self.anti] = (u >= self.anti_lo) & (u < self.anti_hi)
        return fire

    def chunk(self, rng: np.random.Generator, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, cols, values) of the non-zero coefficients of t tokens, row-major."""
        rows, cols = np.nonzero(self.fire(rng, t))
        j = self.spec.magnitude_jitter
        vals = self.dic.scale[cols] * rng.uniform(1 - j, 1 + j, size=len(cols))
        return rows, cols, vals.astype(np.float32)


@dataclass
class Coefficients:
    """Sparse [n_tokens, N] coefficients in CSR form (token-major, the store's flat order)."""

    indptr: np.ndarray  # [n_tokens + 1] int64
    indices: np.ndarray  # [nnz] int32
    values: np.ndarray  # [nnz] float32
    n_features: int

    @property
    def n_tokens(self) -> int:
        return len(self.indptr) - 1

    def dense(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a dense float32 array."""
        a, b = self.indptr[start], self.indptr[stop]
        out = np.zeros((stop - start, self.n_features), dtype=np.float32)
        rows = np.repeat(np.arange(stop - start), np.diff(self.indptr[start : stop + 1]))
        out[rows, self.indices[a:b]] = self.values[a:b]
        return out


def sample(
    spec: SyntheticSpec, dic: Dictionary, n_tokens: int, rng: np.random.Generator
) -> tuple[np.ndarray, Coefficients]:
    """``n_tokens`` activations [n_tokens, d] float32 and their true coefficients."""
    sampler = _Sampler(spec, dic)
    feats = dic.features.astype(np.float64)
    acts = np.empty((n_tokens, spec.d_in), dtype=np.float32)
    indptr = [np.zeros(1, dtype=np.int64)]
    indices, values = [], []
    nnz = 0
    for start in range(0, n_tokens, CHUNK):
        t = min(CHUNK, n_tokens - start)
        rows, cols, vals = sampler.chunk(rng, t)
        counts = np.bincount(rows, minlength=t)
        ends = np.cumsum(counts)
        # Add each token's features in a fixed order (its 1st active feature, then its
        # 2nd, ...) in float64: no BLAS reduction, so the activations are bit-identical
        # whatever the thread count or the machine.
        slot = np.arange(len(rows)) - (ends - counts)[rows]
        x = np.zeros((t, spec.d_in))
        for s in range(int(counts.max(initial=0))):
            m = slot == s
            x[rows[m]] += vals[m, None].astype(np.float64) * feats[cols[m]]
        if spec.noise_std > 0:
            x += spec.noise_std * rng.standard_normal((t, spec.d_in))
        acts[start : start + t] = x
        indptr.append(nnz + ends)
        nnz += len(rows)
        indices.append(cols.astype(np.int32))
        values.append(vals)
    coefs = Coefficients(
        indptr=np.concatenate(indptr),
        indices=np.concatenate(indices) if indices else np.zeros(0, np.int32),
        values=np.concatenate(values) if values else np.zeros(0, np.float32),
        n_features=spec.n_features,
    )
    return acts, coefs


# --- stores and the answer key ----------------------------------------------------------


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block (restored after).

    Synthetic SAEs are small enough that a second thread buys nothing and, on a busy
    machine, makes each step several times slower; a fixed thread count also keeps
    float reductions, and so results, the same on machines with different core counts.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class SyntheticStore(ActivationStore):
    """An in-memory activation store in which every position counts (no BOS). The eval
    store carries the answer key (a ``GroundTruth``), which ``build_env`` hands to tasks."""

    ground_truth: Any = None

    @property
    def keep(self) -> np.ndarray:
        return np.ones(self.acts.shape[1], dtype=bool)


@dataclass
class GroundTruth:
    """The answer key the feature-recovery task scores against.

    ``coefficients`` row t belongs to eval token t in the order ``TaskEnv.iter_tokens``
    yields them (window-major; every position is kept).
    """

    dictionary: Dictionary
    coefficients: Coefficients
    noise_std: float

    @property
    def features(self) -> np.ndarray:
        return self.dictionary.features


def fingerprint(spec: SyntheticSpec, seed: int, part: str, n_windows: int) -> str:
    ident = {**spec.identity(), "seed": seed, "part": part, "n_windows": n_windows, "ctx": CTX}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def make_store(
    spec: SyntheticSpec, dic: Dictionary, part: str, n_tokens: int, seed: int
) -> tuple[SyntheticStore, Coefficients]:
    """One split: ``ceil(n_tokens / CTX)`` whole windows drawn from the split's own stream."""
    n_windows = -(-n_tokens // CTX)
    rng = np.random.default_rng([seed, 104729, _PARTS[part]])
    acts, coefs = sample(spec, dic, n_windows * CTX, rng)
    mean = acts.mean(0, dtype=np.float64).astype(np.float32)
    fp = fingerprint(spec, seed, part, n_windows)
    meta = {
        **spec.identity(),
        "part": part,
        "seed": seed,
        "fingerprint": fp,
        "n_windows": n_windows,
        "ctx_len": CTX,
        "d_model": spec.d_in,
        "n_tokens": n_windows * CTX,
    }
    store = SyntheticStore(
        path=Path(f"synthetic-{part}-{fp}"),
        acts=acts.reshape(n_windows, CTX, spec.d_in),
        tokens=np.zeros((n_windows, CTX), dtype=np.int32),
        mean=mean,
        meta=meta,
    )
    return store, coefs


def make_stores(
    spec: SyntheticSpec, seed: int, train_tokens: int, eval_tokens: int
) -> tuple[SyntheticStore, SyntheticStore, GroundTruth]:
    """Train and eval stores plus the eval split's answer key, all from one dictionary."""
    dic = make_dictionary(spec)
    train_store, _ = make_store(spec, dic, "train", train_tokens, seed)
    eval_store, coefs = make_store(spec, dic, "eval", eval_tokens, seed)
    eval_store.ground_truth = GroundTruth(dic, coefs, spec.noise_std)
    return train_store, eval_store, eval_store.ground_truth
