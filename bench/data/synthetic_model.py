"""The generative model behind dictbench's synthetic activations: the dictionary and
the sampler (what each structural promise of ``dictbench.data.synthetic``'s docstring means
in code).

Split from ``dictbench.data.synthetic`` (the spec section, the stores and the answer key)
because this is the part a reader checks against the maths: frequencies, correlated
and exclusive groups, magnitudes and nearly parallel pairs, and the order in which
random numbers are drawn (which fixes every generated token bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING

import numpy as np

from dictbench.errors import SpecError

if TYPE_CHECKING:
    from dictbench.data.synthetic import SyntheticSpec

# Tokens generated per chunk: bounds the dense [chunk, N] firing matrix in memory.
CHUNK = 8192


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

    @classmethod
    def from_chunks(
        cls, indptr: list[np.ndarray], indices: list[np.ndarray], values: list[np.ndarray], n: int
    ) -> Coefficients:
        """The CSR arrays of chunks generated one after another (``indptr`` starts with
        [0] and holds each chunk's row ends, already offset); no chunk at all is no pair."""
        return cls(
            indptr=np.concatenate(indptr),
            indices=np.concatenate(indices) if indices else np.zeros(0, np.int32),
            values=np.concatenate(values) if values else np.zeros(0, np.float32),
            n_features=n,
        )

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
    return acts, Coefficients.from_chunks(indptr, indices, values, spec.n_features)
