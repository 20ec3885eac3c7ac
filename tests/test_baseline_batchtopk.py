"""The BatchTopK SAE (baselines/batchtopk.py) against hand computations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from synthetic_sparse import ACTIVE, D, M, explained_variance_and_l0, sparse_data, sparse_store

from dictbench.baselines.batchtopk import BatchTopKConfig, BatchTopKSAE
from dictbench.io.sae_io import load_sae, save_sae
from dictbench.registry import get_baseline
from dictbench.spec import BudgetSpec
from dictbench.train.lockstep import Member
from dictbench.train.trainer import train

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def identity_sae(k: int, beta: float = 0.999) -> BatchTopKSAE:
    """d_in = d_sae = 4, identity encoder and decoder, zero biases: pre = x."""
    sae = BatchTopKSAE(BatchTopKConfig(d_in=4, d_sae=4, k=k, threshold_beta=beta))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def random_sae(d_in=8, d_sae=16, k=3, seed=0) -> BatchTopKSAE:
    torch.manual_seed(seed)
    sae = BatchTopKSAE(BatchTopKConfig(d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(d_sae))
        sae.b_dec.copy_(0.3 * torch.randn(d_in))
    return sae


def test_registered_with_saelens_shapes_and_knob():
    assert get_baseline("batchtopk") is BatchTopKSAE
    assert BatchTopKSAE.sparsity_knob == "k" and "k" in BatchTopKConfig.field_names()
    sae = BatchTopKSAE(BatchTopKConfig(d_in=8, d_sae=16))
    assert sae.cfg.k == 32 and sae.cfg.threshold_beta == 0.999
    shapes = {k: tuple(v.shape) for k, v in sae.named_parameters()}
    assert shapes == {"W_enc": (8, 16), "W_dec": (16, 8), "b_enc": (16,), "b_dec": (8,)}
    assert {"threshold", "tokens_since_fired"} <= set(sae.state_dict())
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(16), atol=1e-6)


# --- training-mode selection -------------------------------------------------------------

X1 = torch.tensor([[5.0, 4.0, 3.0, 0.1], [0.5, 0.2, 0.3, 0.4]])


@pytest.mark.parametrize(
    "k, want",
    [
        # k * B = 2 over the batch: both go to token 1, token 2 gets none.
        (1, [[5.0, 4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]),
        (2, [[5.0, 4.0, 3.0, 0.0], [0.5, 0.0, 0.0, 0.0]]),
    ],
)
def test_training_mode_keeps_the_top_k_times_b_over_the_batch(k, want):
    sae = identity_sae(k)
    assert sae.training
    with torch.no_grad():
        assert torch.equal(sae.encode(X1), torch.tensor(want))


def test_training_mode_keeps_exactly_k_b_largest_when_all_positive():
    sae = random_sae(k=3, seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach().numpy()
    assert (pre > 0).all()
    with torch.no_grad():
        f = sae.encode(x).numpy()
    assert (f != 0).sum() == 3 * 32
    per_token = (f != 0).sum(-1)
    assert per_token.min() != per_token.max()  # a batch budget, not a per-token one
    flat_pre, flat_f = pre.reshape(-1), f.reshape(-1)
    top = np.argsort(-flat_pre)[: 3 * 32]
    np.testing.assert_array_equal(np.sort(np.flatnonzero(flat_f)), np.sort(top))
    np.testing.assert_allclose(flat_f[top], flat_pre[top], rtol=1e-6)


# --- eval mode: a JumpReLU at the tracked threshold ----------------------------------------


def test_eval_mode_applies_the_threshold():
    sae = identity_sae(1).eval()
    sae.threshold.fill_(0.35)
    x = torch.cat([X1, torch.tensor([[-1.0, 0.2, 0.36, 0.35]])])
    want = torch.tensor(
        [[5.0, 4.0, 3.0, 0.0], [0.5, 0.0, 0.0, 0.4], [0.0, 0.0, 0.36, 0.0]]  # 0.35 is not > 0.35
    )
    with torch.no_grad():
        assert torch.equal(sae.encode(x), want)
        assert torch.allclose(sae(x), want)  # identity decoder, zero bias


def test_threshold_is_a_bias_corrected_ema_of_the_smallest_kept_activation():
    sae = identity_sae(1, beta=0.5)
    batches = [
        (X1, 4.0),  # kept {5, 4}
        (torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.5]]), 2.0),  # kept {3, 2}
        # kept {3, 0}: the ReLU zeroed one of the k*B, the smallest POSITIVE one counts
        (torch.tensor([[3.0, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]]), 3.0),
    ]
    ema = 0.0
    for t, (x, smallest) in enumerate(batches, start=1):
        sae.loss(x, t - 1)
        ema = 0.5 * ema + 0.5 * smallest
        assert float(sae.threshold) == pytest.approx(ema / (1 - 0.5**t), rel=1e-6)
    assert float(sae.threshold) == pytest.approx(2.5 / 0.875, rel=1e-6)  # 2.857...
    # Nothing positive kept: no update. Eval mode: no update either.
    sae.loss(-torch.ones(2, 4), 3)
    sae.eval()
    sae.loss(X1, 4)
    assert float(sae.threshold) == pytest.approx(2.5 / 0.875, rel=1e-6)


# --- AuxK, shared with TopK ----------------------------------------------------------------

# d_in = 2, d_sae = 4, k = 1, B = 2 (two kept over the batch), latents 2, 3 dead:
#   x - b_dec = [2, 1], [1, 3]: pre1 = [2, 1, 0.8, 1.0], pre2 = [1, 3, 1.8, -1]
#   kept: 3 (token 2, latent 1) and 2 (token 1, latent 0); e1 = [0, 1], e2 = [1, 0]
#   mse = 1; var(e) over the batch = 0.5
#   k_aux = 2: e_hat1 = 0.8 d2 + 1.0 d3 = [1.28, 0.04] -> 2.56; e_hat2 = 1.8 d2 -> 2.08
#              aux = (2.56 + 2.08) / 2 / 0.5 = 4.64
#   k_aux = 1: e_hat1 = 1.0 d3 = [0.8, -0.6] -> 3.2; aux = (3.2 + 2.08) / 2 / 0.5 = 5.28
#   total = mse + var(x) * aux / 32, var(x) = |x - [2, 1.5]|^2 = 1.25 for both tokens


@pytest.mark.parametrize("k_aux, want", [(2, 4.64), (1, 5.28)])
def test_auxk_by_hand(k_aux, want):
    cfg = BatchTopKConfig(d_in=2, d_sae=4, k=1, k_aux=k_aux, dead_tokens_threshold=10)
    sae = BatchTopKSAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, -0.6]]))
        sae.W_enc.copy_(sae.W_dec.t())
        sae.b_enc.copy_(torch.tensor([0.0, 0.0, -1.2, 0.0]))
        sae.b_dec.copy_(torch.tensor([0.5, -0.5]))  # cancels in e, must not enter e_hat
    sae.tokens_since_fired.copy_(torch.tensor([0, 0, 50, 50]))
    x = torch.tensor([[2.5, 0.5], [1.5, 2.5]])  # x - b_dec = [2, 1], [1, 3]
    out = sae.loss(x, 0)
    assert torch.equal(sae.tokens_since_fired, torch.tensor([0, 0, 52, 52]))
    assert float(out.terms["mse"]) == pytest.approx(1.0, abs=1e-6)
    assert float(out.terms["auxk"]) == pytest.approx(want, rel=1e-5)
    assert float(out.total.detach()) == pytest.approx(1.0 + 1.25 * want / 32, rel=1e-6)
    sae.tokens_since_fired.zero_()
    assert float(sae.loss(x, 0).terms["auxk"]) == 0.0


# --- constraints, folding, saving ------------------------------------------------------------


def test_decoder_rows_unit_norm_after_adam_steps():
    sae = random_sae(seed=3)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(4))
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    for step in range(3):
        opt.zero_grad()
        sae.loss(x, step).total.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_step()
        assert (sae.W_dec.detach().norm(dim=-1) - 1).abs().max() < 1e-6


@pytest.mark.parametrize("scale", [3.7, 0.25])
def test_fold_input_scale_in_both_modes(scale):
    trained = random_sae(seed=6)  # stands for an SAE trained on scale * x
    trained.threshold.fill_(0.4)
    folded = copy.deepcopy(trained)
    folded.fold_input_scale(scale)
    assert float(folded.threshold) == pytest.approx(0.4 / scale, rel=1e-6)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(7))
    for mode in ("train", "eval"):
        for m in (trained, folded):
            m.train(mode == "train")
        with torch.no_grad():
            f_scaled = trained.encode(scale * x)
            assert (f_scaled > 0).any() and (f_scaled == 0).any()
            assert torch.allclose(folded.encode(x), f_scaled / scale, atol=1e-5)
            assert torch.allclose(folded(x), trained(scale * x) / scale, atol=1e-5)


def test_save_and_load_keep_the_threshold(tmp_path):
    sae = random_sae(seed=8)
    sae.threshold.fill_(0.25)
    save_sae(sae, tmp_path / "sae", {})
    loaded, _ = load_sae(tmp_path / "sae")
    assert isinstance(loaded, BatchTopKSAE) and not loaded.training
    assert float(loaded.threshold) == 0.25
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.eval().encode(x))


# --- a short training run ------------------------------------------------------------------


def test_training_on_sparse_synthetic_data(tmp_path):
    budget = BudgetSpec(train_tokens=400 * 512, batch_size=512, d_sae=M, lr=1e-2)
    store = sparse_store(tmp_path, budget.train_tokens)
    torch.manual_seed(0)
    sae = BatchTopKSAE(BatchTopKConfig(d_in=D, d_sae=M, k=ACTIVE, dead_tokens_threshold=8192))
    rec = train(Member(sae, "batchtopk", budget.lr), store, budget, seed=0)
    assert rec.steps == 400
    x = torch.from_numpy(sparse_data(4096, seed=99))  # held out
    # Training mode, on the same scale as training: exactly k per token on average.
    assert explained_variance_and_l0(sae, x * rec.input_scale)[1] == pytest.approx(ACTIVE)
    threshold = float(sae.threshold)
    sae.fold_input_scale(rec.input_scale)
    assert float(sae.threshold) == pytest.approx(threshold / rec.input_scale, rel=1e-6)
    sae.eval()
    ev, l0 = explained_variance_and_l0(sae, x)
    assert ev > 0.8
    assert 0.7 * ACTIVE <= l0 <= 1.3 * ACTIVE  # the threshold reproduces k per token, roughly
