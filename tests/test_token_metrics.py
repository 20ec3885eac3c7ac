"""Token metrics checked against values worked out by hand or in closed form.

Each test targets one way a formula could be wrong (uncentred variance, mean of
ratios instead of ratio of sums, batch-size dependence, counting BOS tokens).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dictbench.registry import get_task
from dictbench.tasks.base import TaskEnv, TaskResult, TokenTask
from dictbench.tasks.dead_latents import BIN_EDGES, DeadLatents, DeadLatentsAccumulator
from dictbench.tasks.reconstruction import Reconstruction, ReconstructionAccumulator
from dictbench.tasks.shrinkage import Shrinkage, ShrinkageAccumulator
from dictbench.tasks.sparsity import Sparsity, SparsityAccumulator

TOL = 1e-6


class ScaleSAE(torch.nn.Module):
    """f = x, x_hat = scale * f: reconstruction metrics then have closed forms."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.scale * f


class ConstantSAE(torch.nn.Module):
    """Always reconstructs the same vector, whatever the input."""

    def __init__(self, value: np.ndarray) -> None:
        super().__init__()
        self.value = torch.as_tensor(value, dtype=torch.float32)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.value.expand(f.shape[0], -1)


class RandomSAE(torch.nn.Module):
    """A generic ReLU SAE, so every metric is non-trivial."""

    def __init__(self, d: int, m: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(d, m, generator=g) / math.sqrt(d)
        self.b = torch.randn(m, generator=g) * 0.5

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w + self.b)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.w.T


def make_env(acts: np.ndarray, keep: np.ndarray | None = None, **kwargs) -> TaskEnv:
    acts = np.asarray(acts, dtype=np.float32)
    if acts.ndim == 2:  # one token per sequence
        acts = acts[:, None, :]
    n_seq, ctx, d = acts.shape
    return TaskEnv(
        eval_acts=acts,
        eval_token_ids=np.zeros((n_seq, ctx), dtype=np.int64),
        keep_positions=np.ones(ctx, dtype=bool) if keep is None else keep,
        train_mean=np.zeros(d, dtype=np.float32),
        **kwargs,
    )


def random_acts(n_seq: int = 6, ctx: int = 5, d: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n_seq, ctx, d)) + rng.normal(size=d)).astype(np.float32)


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize(
    "cls", [Sparsity, Reconstruction, Shrinkage, DeadLatents], ids=lambda c: c.name
)
def test_registered_under_file_stem(cls: type[TokenTask]) -> None:
    assert cls.name == cls.__module__.rsplit(".", 1)[-1]
    assert get_task(cls.name) is cls


# ---------------------------------------------------------------- sparsity


def test_l0_l1_hand_made_f() -> None:
    # Token 1: two nonzeros, |1| + |-2| = 3.  Token 2: none.  Token 3: two, 3 + 0.5 = 3.5.
    # l0 = (2 + 0 + 2) / 3, l1 = (3 + 0 + 3.5) / 3.  Negative latents count for both.
    f = torch.tensor([[0.0, 1.0, -2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.5]])
    acc = SparsityAccumulator()
    acc.update(torch.zeros(3, 2), f, torch.zeros(3, 2))
    res = acc.result()
    assert res.eval_tokens == 3
    assert res.metrics["l0"] == pytest.approx(4 / 3, abs=TOL)
    assert res.metrics["l1"] == pytest.approx(6.5 / 3, abs=TOL)


def test_l0_l1_through_run() -> None:
    # With f = x, l0 counts nonzero coordinates of x.
    acts = np.array([[1.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    res = Sparsity().run(ScaleSAE(1.0), make_env(acts))
    assert res.metrics == pytest.approx({"l0": 1.0, "l1": 1.0}, abs=TOL)
    assert res.eval_tokens == 2


# ---------------------------------------------------------------- reconstruction


def test_perfect_reconstruction() -> None:
    env = make_env(random_acts())
    rec = Reconstruction().run(ScaleSAE(1.0), env).metrics
    assert rec["mse"] == pytest.approx(0.0, abs=TOL)
    assert rec["fvu"] == pytest.approx(0.0, abs=TOL)
    assert rec["explained_variance"] == pytest.approx(1.0, abs=TOL)
    assert rec["cossim"] == pytest.approx(1.0, abs=TOL)
    shr = Shrinkage().run(ScaleSAE(1.0), env).metrics
    assert shr["relative_reconstruction_bias"] == pytest.approx(1.0, abs=TOL)
    assert shr["l2_ratio"] == pytest.approx(1.0, abs=TOL)


def test_mean_reconstruction_has_fvu_one() -> None:
    acts = random_acts()
    mu = acts.reshape(-1, acts.shape[-1]).astype(np.float64).mean(0)
    rec = Reconstruction().run(ConstantSAE(mu), make_env(acts)).metrics
    assert rec["fvu"] == pytest.approx(1.0, abs=TOL)
    assert rec["explained_variance"] == pytest.approx(0.0, abs=TOL)


def test_mse_fvu_hand_example() -> None:
    # x = [1,2],[3,4],[5,6]; mu = [3,4]; x - mu = [-2,-2],[0,0],[2,2]
    #   -> sum ||x - mu||^2 = 8 + 0 + 8 = 16.
    # x_hat = [1,1],[3,3],[5,5]; x - x_hat = [0,1] for every token -> sum = 3.
    # mse = 3 / 3 = 1; fvu = 3 / 16 = 0.1875.
    # cos: token 1 <x,x_hat> = 3, |x| = sqrt5, |x_hat| = sqrt2 -> 3/sqrt10, and so on.
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 3.0], [5.0, 5.0]])
    acc = ReconstructionAccumulator()
    acc.update(x, x, x_hat)
    res = acc.result()
    cos = (3 / math.sqrt(10) + 7 / math.sqrt(25 * 2) + 11 / math.sqrt(61 * 2)) / 3
    assert res.eval_tokens == 3
    assert res.metrics["mse"] == pytest.approx(1.0, abs=TOL)
    assert res.metrics["fvu"] == pytest.approx(0.1875, abs=TOL)
    assert res.metrics["explained_variance"] == pytest.approx(0.8125, abs=TOL)
    assert res.metrics["cossim"] == pytest.approx(cos, abs=TOL)


def test_fvu_uses_centred_variance() -> None:
    # Same example shifted by 1000: errors and centred variance are unchanged, so
    # fvu stays 3/16. The uncentred E||x||^2 (~2e6 per token) would give ~5e-7.
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]) + 1000.0
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 3.0], [5.0, 5.0]]) + 1000.0
    acc = ReconstructionAccumulator()
    acc.update(x, x, x_hat)
    assert acc.result().metrics["fvu"] == pytest.approx(0.1875, abs=TOL)


def test_mse_independent_of_batch_size() -> None:
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(size=(17, 5)).astype(np.float32))
    x_hat = x * 0.7 + 0.1
    whole, single = ReconstructionAccumulator(), ReconstructionAccumulator()
    whole.update(x, x, x_hat)
    for i in range(len(x)):
        single.update(x[i : i + 1], x[i : i + 1], x_hat[i : i + 1])
    expected_mse = float(((x - x_hat).double() ** 2).sum(1).mean())
    assert whole.result().metrics == pytest.approx(single.result().metrics, abs=1e-9)
    assert single.result().metrics["mse"] == pytest.approx(expected_mse, abs=TOL)


def test_batching_through_env_does_not_change_metrics() -> None:
    acts = random_acts(n_seq=7, ctx=3)
    sae = RandomSAE(4, 8)
    small = make_env(acts, batch_tokens=1)  # one sequence per batch
    large = make_env(acts, batch_tokens=10_000)
    for task in (Sparsity(), Reconstruction(), Shrinkage(), DeadLatents()):
        assert task.run(sae, small).metrics == pytest.approx(task.run(sae, large).metrics, abs=1e-9)


def test_zero_reconstruction_has_cossim_zero() -> None:
    acts = random_acts()
    rec = Reconstruction().run(ScaleSAE(0.0), make_env(acts)).metrics
    assert rec["cossim"] == 0.0
    norms_sq = (acts.astype(np.float64) ** 2).sum(-1)
    assert rec["mse"] == pytest.approx(norms_sq.mean(), rel=TOL)


# ---------------------------------------------------------------- shrinkage


def test_half_scale_shrinkage() -> None:
    shr = Shrinkage().run(ScaleSAE(0.5), make_env(random_acts())).metrics
    assert shr["relative_reconstruction_bias"] == pytest.approx(0.5, abs=TOL)
    assert shr["l2_ratio"] == pytest.approx(0.5, abs=TOL)


def test_bias_is_ratio_of_sums_and_l2_ratio_mean_of_ratios() -> None:
    # Token 1: x = [1,0], x_hat = x (scale 1).  Token 2: x = [0,2], x_hat = [0,1] (scale 0.5).
    # gamma = (1 + 1) / (1 + 2) = 2/3, whereas the mean of per-token scales is 0.75.
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x_hat = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    acc = ShrinkageAccumulator()
    acc.update(x, x, x_hat)
    res = acc.result()
    assert res.metrics["relative_reconstruction_bias"] == pytest.approx(2 / 3, abs=TOL)
    assert res.metrics["l2_ratio"] == pytest.approx(0.75, abs=TOL)
    assert res.eval_tokens == 2


# ---------------------------------------------------------------- dead latents


def hand_made_f() -> torch.Tensor:
    # 20 tokens, 5 latents:
    #   0: only negative values -> density 0 (dead; f > 0 is what counts)
    #   1: fires on every token -> density 1 (dense)
    #   2: fires once            -> density 0.05 (alive, not dense)
    #   3: fires on 3 tokens     -> density 0.15 (dense)
    #   4: fires on 2 tokens     -> density 0.1 exactly (not dense: the test is > 0.1)
    f = torch.zeros(20, 5)
    f[:, 0] = -1.0
    f[:, 1] = 2.0
    f[7, 2] = 0.3
    f[[0, 5, 19], 3] = 1.0
    f[[10, 12], 4] = 5.0
    return f


def test_dead_dense_fractions_hand_made_f() -> None:
    acc = DeadLatentsAccumulator()
    f = hand_made_f()
    acc.update(torch.zeros(20, 2), f, torch.zeros(20, 2))
    res = acc.result()
    assert res.metrics["frac_dead"] == pytest.approx(0.2, abs=TOL)
    assert res.metrics["frac_alive"] == pytest.approx(0.8, abs=TOL)
    assert res.metrics["frac_dense"] == pytest.approx(0.4, abs=TOL)
    assert res.metrics["window_tokens"] == 20
    assert res.eval_tokens == 20
    assert res.details["window_tokens"] == 20
    assert res.details["window_below_10m"] is True  # 20 < 10 * 5

    hist = res.details["log10_density_hist"]
    edges = hist["log10_density_bin_edges"]
    assert len(edges) == 33 and edges[0] == -8.0 and edges[-1] == 0.0
    assert np.allclose(np.diff(edges), 0.25)
    # log10(1) = 0 -> last bin (31); log10(0.05) = -1.30 -> bin 26;
    # log10(0.15) = -0.82 and log10(0.1) = -1 (a left edge) -> bin 28.
    expected = [0] * 32
    expected[31] = expected[26] = 1
    expected[28] = 2
    assert hist["counts"] == expected
    assert hist["n_dead"] == 1


def test_dead_latents_split_batches_and_window() -> None:
    f = hand_made_f()
    acc = DeadLatentsAccumulator()
    for i in range(0, 20, 3):
        acc.update(torch.zeros(len(f[i : i + 3]), 2), f[i : i + 3], torch.zeros(0))
    assert acc.result().metrics["frac_dense"] == pytest.approx(0.4, abs=TOL)
    # A window of 5 tokens sees latents 2 and 4 never fire (first firing at tokens 7, 10).
    short = DeadLatentsAccumulator(max_tokens=5)
    for i in range(0, 20, 3):
        short.update(torch.zeros(3, 2), f[i : i + 3], torch.zeros(3, 2))
    res = short.result()
    assert res.metrics["window_tokens"] == 5
    assert res.metrics["frac_dead"] == pytest.approx(0.6, abs=TOL)
    # Densities 1 and 0.2 are both dense.
    assert res.metrics["frac_dense"] == pytest.approx(0.4, abs=TOL)


def test_density_below_1e8_lands_in_first_bin() -> None:
    # One firing in 2e9 tokens (density 5e-10) would need a 2e9-token pass, so the
    # window length is set directly after feeding the one firing token.
    acc = DeadLatentsAccumulator()
    acc.update(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2))
    acc.n = 2 * 10**9
    hist = acc.result().details["log10_density_hist"]
    assert hist["counts"][0] == 1 and sum(hist["counts"]) == 1
    assert hist["n_dead"] == 1


def test_dead_latents_max_tokens_option_and_long_window() -> None:
    acts = np.ones((50, 1, 2), dtype=np.float32)
    acts[::2, 0, 1] = -1.0  # latent 1 fires on every other token
    env = make_env(acts, options={"dead_latents": {"max_tokens": 30}})
    res = DeadLatents().run(ScaleSAE(1.0), env)
    assert res.eval_tokens == 30
    assert res.metrics["frac_dead"] == 0.0
    assert res.metrics["frac_dense"] == 1.0
    assert "window_below_10m" not in res.details  # 30 >= 10 * 2


# ---------------------------------------------------------------- excluded positions


def test_excluded_positions_do_not_count() -> None:
    acts = random_acts(n_seq=6, ctx=5, d=4)
    with_bos = acts.copy()
    with_bos[:, 0, :] = 1e4  # a BOS-like outlier
    keep = np.ones(5, dtype=bool)
    keep[0] = False
    sae = RandomSAE(4, 8)
    excluded = make_env(with_bos, keep=keep)
    stripped = make_env(np.ascontiguousarray(acts[:, 1:, :]))
    for task in (Sparsity(), Reconstruction(), Shrinkage(), DeadLatents()):
        a: TaskResult = task.run(sae, excluded)
        b: TaskResult = task.run(sae, stripped)
        assert a.eval_tokens == b.eval_tokens == 6 * 4
        assert a.metrics == pytest.approx(b.metrics, abs=1e-9)
    # Sanity: the outlier does change the metrics when it is not excluded.
    included = make_env(with_bos)
    assert (
        Reconstruction().run(sae, included).metrics["mse"]
        > 1e3 * (Reconstruction().run(sae, stripped).metrics["mse"])
    )


def test_bin_edges_constant() -> None:
    assert np.allclose(BIN_EDGES, np.arange(-8.0, 0.01, 0.25))
