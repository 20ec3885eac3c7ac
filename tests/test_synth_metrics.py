"""SynthSAEBench's metrics (tasks/synth_metrics.py) against closed forms, brute force and
hand counts, and through the feature_recovery task on an exact oracle."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from dictbench.data.synthetic import SyntheticSpec, make_stores
from dictbench.tasks import synth_metrics as sm
from dictbench.tasks.base import TaskEnv
from dictbench.tasks.feature_recovery import FeatureRecovery

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_permuted_signed_scaled_identity_scores_one():
    features = np.eye(5)
    perm = [3, 0, 4, 1, 2]
    w = torch.tensor(features[perm] * np.array([[2.0], [-1.0], [0.5], [3.0], [-7.0]]))
    a = sm.abs_cosines(features, w)
    assert sm.mcc(a) == pytest.approx(1.0, abs=1e-12)
    assert sm.uniqueness(a) == 1.0
    assert sm.best_features(a).tolist() == perm


def test_hungarian_beats_the_greedy_match_by_hand():
    # True features e1, e2, e3 in R^4; |cos| of each latent with them is its components.
    # w1: (0.6, 0.55, 0), w2: (0.58, 0.05, 0). Greedy (w1 -> e1) gives (0.6 + 0.05) / 2;
    # the optimal one-to-one match w1 -> e2, w2 -> e1 gives (0.55 + 0.58) / 2 = 0.565.
    features = np.eye(4)[:3]
    w = torch.tensor(
        [
            [0.6, 0.55, 0.0, math.sqrt(1 - 0.36 - 0.3025)],
            [-0.58, 0.05, 0.0, math.sqrt(1 - 0.3364 - 0.0025)],
        ],
        dtype=torch.float64,
    )
    a = sm.abs_cosines(features, w)
    assert sm.mcc(a) == pytest.approx(0.565, abs=1e-12)
    # Both latents' best feature is e1: one distinct feature over two latents.
    assert sm.uniqueness(a) == 0.5


@pytest.mark.parametrize("m, n", [(3, 5), (5, 3), (4, 4)])
def test_mcc_equals_brute_force_over_all_matchings(m, n):
    rng = np.random.default_rng(m * 10 + n)
    features = rng.standard_normal((n, 6))
    w = torch.tensor(rng.standard_normal((m, 6)))
    a = sm.abs_cosines(features, w).numpy()
    k = min(m, n)
    best = 0.0
    for rows in itertools.permutations(range(m), k):
        for cols in itertools.permutations(range(n), k):
            best = max(best, sum(a[r, c] for r, c in zip(rows, cols, strict=True)) / k)
    assert sm.mcc(torch.from_numpy(a)) == pytest.approx(best, abs=1e-12)


def test_zero_decoder_row_has_zero_cosines():
    a = sm.abs_cosines(np.eye(3), torch.zeros(2, 3))
    assert torch.equal(a, torch.zeros(2, 3))


def test_per_latent_precision_recall_f1_by_hand():
    # Latent 0 reads feature 0: fires on tokens 0, 1, 2; feature 0 is on at 1, 2, 3:
    # TP 2, FP 1, FN 1 -> precision = recall = F1 = 2/3. Latent 1 reads feature 1, never
    # fires, feature 1 is on at token 0: all three 0. Means over latents: 1/3 each.
    det = sm.LatentDetection(torch.tensor([0, 1]))
    f = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.5, 0.0], [0.0, 0.0]])
    c = torch.tensor([[0.0, 1.0, 9.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    # In two batches: counts accumulate.
    det.add(f[:2], c[:2])
    det.add(f[2:], c[2:])
    s = det.scores()
    assert s["precision"] == pytest.approx(1 / 3)
    assert s["recall"] == pytest.approx(1 / 3)
    assert s["f1"] == pytest.approx(1 / 3)


def test_negative_latent_counts_as_firing():
    # f != 0 fires, as in SynthSAEBench (which admits signed architectures).
    det = sm.LatentDetection(torch.tensor([0]))
    det.add(torch.tensor([[-1.0]]), torch.tensor([[2.0]]))
    assert det.scores() == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


# --- through the task ------------------------------------------------------------------------


class InverseSAE(torch.nn.Module):
    def __init__(self, w_enc: np.ndarray, w_dec: np.ndarray, theta: float):
        super().__init__()
        self.W_enc = torch.nn.Parameter(torch.tensor(w_enc, dtype=torch.float32))
        self.W_dec = torch.nn.Parameter(torch.tensor(w_dec, dtype=torch.float32))
        self.theta = theta

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = x @ self.W_enc
        return pre * (pre > self.theta)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec


def test_exact_oracle_scores_one_on_every_synthsaebench_metric():
    """N = d, no noise: the inverse dictionary reads back the true coefficients, and
    its decoder rows are the (permuted) true features."""
    spec = SyntheticSpec(
        d_in=16, n_features=16, mean_active=2, noise_std=0.0, parallel_pairs=0,
        correlated_groups=1, anticorrelated_groups=1,
    )  # fmt: skip
    _, ev, truth = make_stores(spec, 1, 128, 2048)
    d = truth.features.astype(np.float64)
    perm = np.random.default_rng(0).permutation(16)
    w_dec = d[perm]
    sae = InverseSAE(np.linalg.inv(w_dec), w_dec, 1e-3)
    env = TaskEnv(
        eval_acts=ev.acts,
        eval_token_ids=ev.tokens,
        keep_positions=ev.keep,
        train_mean=ev.mean,
        batch_tokens=512,
        options={},
        ground_truth=ev.ground_truth,
    )
    m = FeatureRecovery().run(sae, env).metrics
    for key in ("mcc", "uniqueness", "latent_precision", "latent_recall", "latent_f1"):
        assert m[key] == pytest.approx(1.0, abs=1e-6), key
