"""The synthetic generator (bench/data/synthetic.py): each structural promise of its docstring
checked against an independent computation (closed forms, exact geometry, binomial
bounds), plus determinism and the spec section's strict validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import multivariate_normal, norm

from dictbench import spec as spec_mod
from dictbench.data.synthetic import (
    CTX,
    SyntheticSpec,
    make_dictionary,
    make_store,
    make_stores,
    power_law_freqs,
)
from dictbench.errors import SpecError
from dictbench.train.trainer import token_order

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SPEC = SyntheticSpec()  # the defaults are the benchmark's problem


@pytest.fixture(scope="module")
def big_sample():
    """60k eval-stream tokens of the default problem and their dense coefficients."""
    dic = make_dictionary(SPEC)
    store, coefs = make_store(SPEC, dic, "eval", 60_000, seed=0)
    return dic, store, coefs.dense(0, coefs.n_tokens)


# --- frequencies -----------------------------------------------------------------------


def test_power_law_sums_to_mean_active_and_follows_the_exponent():
    p = power_law_freqs(128, 3.0, 1.0, 0.2)
    assert p.sum() == pytest.approx(3.0, rel=1e-9)
    assert p.max() == pytest.approx(0.2) and (p <= 0.2 + 1e-15).all()
    free = np.flatnonzero(p < 0.2)
    i, j = free[0], free[-1]
    # Uncapped ranks follow C r^-alpha exactly, so their ratio is (r_j / r_i)^-1.
    assert p[j] / p[i] == pytest.approx((i + 1) / (j + 1), rel=1e-9)
    assert (np.diff(p) <= 0).all()  # feature i is the i-th most frequent


def test_power_law_without_cap_binding():
    p = power_law_freqs(10, 0.5, 2.0, 1.0)
    c = 0.5 / sum(r**-2.0 for r in range(1, 11))
    np.testing.assert_allclose(p, [c * r**-2.0 for r in range(1, 11)], rtol=1e-9)


def test_empirical_frequencies_match_within_binomial_bounds(big_sample):
    dic, _, c = big_sample
    n = c.shape[0]
    emp = (c > 0).mean(0)
    sd = np.sqrt(dic.freq * (1 - dic.freq) / n)
    assert (np.abs(emp - dic.freq) <= 5 * sd + 1e-12).all()
    assert (c > 0).sum(1).mean() == pytest.approx(SPEC.mean_active, abs=5 * np.sqrt(3.0 / n) + 0.02)


# --- correlation structure ---------------------------------------------------------------


def test_anticorrelated_groups_never_fire_together(big_sample):
    dic, _, c = big_sample
    assert len(dic.anticorrelated) == SPEC.anticorrelated_groups
    for grp in dic.anticorrelated:
        assert ((c[:, grp] > 0).sum(1) <= 1).all()


def test_correlated_pairs_cofire_at_the_gaussian_copula_rate(big_sample):
    dic, _, c = big_sample
    n = c.shape[0]
    rho = SPEC.group_corr
    for grp in dic.correlated:
        a, b = grp[0], grp[1]
        ta, tb = norm.ppf(1 - dic.freq[a]), norm.ppf(1 - dic.freq[b])
        # P(z_a > ta, z_b > tb) for a standard bivariate normal with correlation rho.
        both = multivariate_normal(mean=[0, 0], cov=[[1, rho], [rho, 1]]).cdf([-ta, -tb])
        emp = ((c[:, a] > 0) & (c[:, b] > 0)).mean()
        assert emp == pytest.approx(both, abs=5 * math.sqrt(both / n) + 1e-4)
        assert both > 5 * dic.freq[a] * dic.freq[b]  # far above independence


def test_groups_and_pairs_use_disjoint_features():
    dic = make_dictionary(SPEC)
    used = [i for g in dic.correlated + dic.anticorrelated for i in g]
    used += [i for pair in dic.pairs for i in pair]
    assert len(used) == len(set(used))
    assert len(used) == 2 * SPEC.parallel_pairs + SPEC.group_size * 8


# --- geometry and magnitudes ---------------------------------------------------------------


def test_features_are_unit_and_pairs_nearly_parallel():
    dic = make_dictionary(SPEC)
    d = dic.features.astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-6)
    for a, b in dic.pairs:
        assert d[a] @ d[b] == pytest.approx(SPEC.parallel_cos, abs=1e-6)
    gram = np.abs(d @ d.T - np.eye(len(d)))
    for a, b in dic.pairs:
        gram[a, b] = gram[b, a] = 0
    assert gram.max() < SPEC.parallel_cos  # only the planted pairs are that close


def test_magnitudes_are_scale_times_uniform_jitter(big_sample):
    dic, _, c = big_sample
    rows, cols = np.nonzero(c)
    ratio = c[rows, cols] / dic.scale[cols]
    j = SPEC.magnitude_jitter
    assert ratio.min() >= 1 - j - 1e-6 and ratio.max() <= 1 + j + 1e-6
    # U(1 - j, 1 + j): mean 1, variance j^2 / 3.
    assert ratio.mean() == pytest.approx(1.0, abs=5 * j / math.sqrt(3 * len(ratio)))
    assert ratio.var() == pytest.approx(j**2 / 3, rel=0.05)


def test_activations_are_coefficients_times_features_plus_noise(big_sample):
    dic, store, c = big_sample
    x = store.acts.reshape(-1, SPEC.d_in).astype(np.float64)
    resid = x - c.astype(np.float64) @ dic.features.astype(np.float64)
    assert abs(resid.mean()) < 5 * SPEC.noise_std / math.sqrt(resid.size)
    assert resid.std() == pytest.approx(SPEC.noise_std, rel=0.01)


def test_no_noise_means_exact_combinations():
    spec = SyntheticSpec(noise_std=0.0)
    dic = make_dictionary(spec)
    store, coefs = make_store(spec, dic, "train", 1000, seed=3)
    x = store.acts.reshape(-1, spec.d_in)
    np.testing.assert_allclose(x, coefs.dense(0, coefs.n_tokens) @ dic.features, atol=1e-5)


# --- stores, seeds, determinism ------------------------------------------------------------


def test_store_shape_keep_and_mean():
    train, ev, truth = make_stores(SPEC, 0, 1000, 300)
    assert train.acts.shape == (-(-1000 // CTX), CTX, SPEC.d_in)
    assert ev.acts.shape == (3, CTX, SPEC.d_in)
    assert train.keep.all() and train.n_tokens == train.acts.shape[0] * CTX
    flat = train.acts.reshape(-1, SPEC.d_in).astype(np.float64)
    np.testing.assert_allclose(train.mean, flat.mean(0), atol=1e-6)
    # Every token, position 0 included, is in the trainer's order exactly once.
    order = token_order(train, 0)
    assert sorted(order.tolist()) == list(range(train.n_tokens))
    assert truth.coefficients.n_tokens == ev.n_tokens
    assert ev.ground_truth is truth and train.ground_truth is None
    assert train.meta["fingerprint"] != ev.meta["fingerprint"]


def test_deterministic_given_seeds():
    a_train, a_eval, a_truth = make_stores(SPEC, 5, 2000, 500)
    b_train, b_eval, b_truth = make_stores(SPEC, 5, 2000, 500)
    assert np.array_equal(a_train.acts, b_train.acts)
    assert np.array_equal(a_eval.acts, b_eval.acts)
    assert np.array_equal(a_truth.coefficients.values, b_truth.coefficients.values)
    assert a_train.meta["fingerprint"] == b_train.meta["fingerprint"]
    # Another run seed: new samples from the same dictionary.
    c_train, _, c_truth = make_stores(SPEC, 6, 2000, 500)
    assert not np.array_equal(a_train.acts, c_train.acts)
    assert np.array_equal(a_truth.features, c_truth.features)
    assert c_train.meta["fingerprint"] != a_train.meta["fingerprint"]
    # Another dictionary seed: another dictionary.
    other = make_dictionary(SyntheticSpec(dictionary_seed=1))
    assert not np.allclose(other.features, a_truth.features)


def test_train_and_eval_streams_differ():
    train, ev, _ = make_stores(SPEC, 0, 1000, 1000)
    assert not np.array_equal(train.acts, ev.acts)


def test_coefficients_dense_matches_csr_slices():
    _, _, truth = make_stores(SPEC, 0, 256, 700)
    coefs = truth.coefficients
    full = coefs.dense(0, coefs.n_tokens)
    np.testing.assert_array_equal(coefs.dense(100, 333), full[100:333])
    assert (full > 0).sum() == len(coefs.values)


# --- spec section ----------------------------------------------------------------------


def test_synthetic_preset_resolves_without_model_or_corpus():
    spec = spec_mod.resolve(preset="synthetic")
    assert spec.synthetic == SPEC
    assert "feature_recovery" in spec.tasks


@pytest.mark.parametrize(
    "override, field",
    [
        ("synthetic.d_in=1", "synthetic.d_in"),
        ("synthetic.max_freq=0", "synthetic.max_freq"),
        ("synthetic.mean_active=100", "synthetic.mean_active"),
        ("synthetic.group_size=1", "synthetic.group_size"),
        ("synthetic.group_corr=1", "synthetic.group_corr"),
        ("synthetic.magnitude_jitter=1", "synthetic.magnitude_jitter"),
        ("synthetic.parallel_cos=1", "synthetic.parallel_cos"),
        ("synthetic.noise_std=-0.1", "synthetic.noise_std"),
        ("synthetic.n_features=20", "synthetic:"),
        ("synthetic.bogus=1", "synthetic.bogus"),
        ("synthetic.d_in=abc", "synthetic.d_in"),
    ],
)
def test_bad_synthetic_fields_name_the_field(override, field):
    with pytest.raises(SpecError) as err:
        spec_mod.resolve(preset="synthetic", overrides=[override])
    assert str(err.value).removeprefix("spec.").startswith(field)
    assert "\n" not in str(err.value)


def test_exclusive_groups_must_be_possible():
    # freq_exponent 0: every feature fires with p = 38.4 / 128 = 0.3, and 4 x 0.3 > 1.
    spec = SyntheticSpec(freq_exponent=0.0, max_freq=0.5, mean_active=38.4)
    spec.validate()  # fine field by field; only the frequencies rule it out
    with pytest.raises(SpecError, match="synthetic.anticorrelated_groups"):
        make_dictionary(spec)


def test_ground_truth_task_needs_a_synthetic_section():
    with pytest.raises(SpecError, match=r"tasks\[\d\]: feature_recovery needs a known dictionary"):
        spec_mod.resolve(preset="smoke", overrides=["tasks=[sparsity, feature_recovery]"])
