"""The April-2024-update L1 SAE (baselines/l1_april.py) against hand computations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dictbench import registry
from dictbench.baselines.l1_april import L1AprilConfig, L1AprilSAE
from dictbench.data.cache import ActivationStore
from dictbench.io.sae_io import load_sae, save_sae
from dictbench.spec import BudgetSpec
from dictbench.train.lockstep import Member
from dictbench.train.trainer import train

pytestmark = pytest.mark.usefixtures("torch_one_thread")


# --- a hand-set example: d_in = 2, d_sae = 3, decoder rows of norm [2, 0.5, 0.5] ----------


def hand_sae(coefficient: float = 2.0, total_steps: int = 100) -> L1AprilSAE:
    sae = L1AprilSAE(L1AprilConfig(d_in=2, d_sae=3, l1_coefficient=coefficient))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
        sae.W_dec.copy_(torch.tensor([[2.0, 0.0], [0.0, 0.5], [0.3, 0.4]]))
        sae.b_enc.copy_(torch.tensor([0.0, -0.5, 0.1]))
        sae.b_dec.copy_(torch.tensor([0.5, -0.5]))
    sae.total_steps = total_steps
    return sae


# By hand (no input centring), x1 = [1, 1], x2 = [0.5, -1]:
#   x1 W_enc = [1, 1, 2]; + b_enc = [1, 0.5, 2.1] -> f1 = [1, 0.5, 2.1]
#   x_hat1 = [2, 0] + [0, 0.25] + 2.1 [0.3, 0.4] + b_dec = [3.13, 0.59]
#   err^2 = 2.13^2 + 0.41^2 = 4.5369 + 0.1681 = 4.705
#   penalty1 = 1 * 2 + 0.5 * 0.5 + 2.1 * 0.5 = 3.3 (plain ||f||_1 would be 3.6)
#   x2 W_enc = [0.5, -1, -0.5]; + b_enc = [0.5, -1.5, -0.4] -> f2 = [0.5, 0, 0]
#   x_hat2 = [1, 0] + b_dec = [1.5, -0.5]; err^2 = 1 + 0.25 = 1.25; penalty2 = 0.5 * 2 = 1
HAND_X = torch.tensor([[1.0, 1.0], [0.5, -1.0]])
HAND_F = torch.tensor([[1.0, 0.5, 2.1], [0.5, 0.0, 0.0]])
HAND_XHAT = torch.tensor([[3.13, 0.59], [1.5, -0.5]])
HAND_MSE = (4.705 + 1.25) / 2
HAND_L1 = (3.3 + 1.0) / 2


def test_encode_decode_by_hand():
    sae = hand_sae()
    with torch.no_grad():
        f = sae.encode(HAND_X)
        assert torch.allclose(f, HAND_F, atol=1e-6)
        assert torch.allclose(sae.decode(f), HAND_XHAT, atol=1e-6)
        assert torch.allclose(sae(HAND_X), HAND_XHAT, atol=1e-6)


@pytest.mark.parametrize(
    "step, factor",
    [(50, 1.0), (4, 1.0), (2, 0.6), (0, 0.2)],  # default warm-up: int(0.05 * 100) = 5 steps
)
def test_loss_terms_by_hand(step, factor):
    sae = hand_sae(coefficient=2.0, total_steps=100)
    out = sae.loss(HAND_X, step)
    assert set(out.terms) == {"mse", "l1"}
    assert all(not t.requires_grad for t in out.terms.values())
    assert float(out.terms["mse"]) == pytest.approx(HAND_MSE, abs=1e-5)
    assert float(out.terms["l1"]) == pytest.approx(HAND_L1, abs=1e-6)
    want = HAND_MSE + 2.0 * factor * HAND_L1
    assert float(out.total.detach()) == pytest.approx(want, abs=1e-5)
    assert torch.allclose(out.latents, HAND_F, atol=1e-6)


def test_penalty_gradient_pulls_on_decoder_row_norms():
    """d(lambda * mean_b sum_i f_i ||w_i||)/dw_i = lambda * mean_b(f_i) * w_i / ||w_i||."""
    x = HAND_X
    with_penalty, without = hand_sae(coefficient=2.0), hand_sae(coefficient=0.0)
    with_penalty.loss(x, 10**6).total.backward()
    without.loss(x, 10**6).total.backward()
    diff = with_penalty.W_dec.grad - without.W_dec.grad
    w = torch.tensor([[2.0, 0.0], [0.0, 0.5], [0.3, 0.4]])
    mean_f = HAND_F.mean(0)  # [0.75, 0.25, 1.05]
    want = 2.0 * mean_f[:, None] * w / w.norm(dim=-1, keepdim=True)
    assert torch.allclose(diff, want, atol=1e-6)


# --- random instances -----------------------------------------------------------------


def random_sae(d_in: int = 8, d_sae: int = 16, seed: int = 0) -> L1AprilSAE:
    torch.manual_seed(seed)
    sae = L1AprilSAE(L1AprilConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=0.5))
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(5.0, 15.0, d_sae)[:, None])  # norms 0.5 .. 1.5
        sae.W_enc.copy_(sae.W_dec.t())
        sae.b_enc.copy_(0.3 * torch.randn(d_sae))
        sae.b_dec.copy_(0.3 * torch.randn(d_in))
    return sae


def batch(seed: int, n: int = 64, d: int = 8) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_shapes_names_and_init():
    torch.manual_seed(1)
    sae = L1AprilSAE(L1AprilConfig(d_in=8, d_sae=16))
    shapes = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    assert shapes == {"W_enc": (8, 16), "W_dec": (16, 8), "b_enc": (16,), "b_dec": (8,)}
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.full((16,), 0.1), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()
    assert torch.equal(sae.b_enc, torch.zeros(16)) and torch.equal(sae.b_dec, torch.zeros(8))
    cos = (sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)) @ (sae.W_dec / 0.1).t()
    assert (cos - torch.eye(16)).abs().max() < 0.99  # random directions, not repeated
    x = batch(2, n=5)
    with torch.no_grad():
        assert sae.encode(x).shape == (5, 16)
        assert sae.decode(sae.encode(x)).shape == (5, 8)
        assert sae(x).shape == (5, 8)


def test_registered_with_documented_defaults():
    assert registry.get_baseline("l1_april") is L1AprilSAE
    assert L1AprilSAE.sparsity_knob == "l1_coefficient"
    assert L1AprilSAE.sparsity_knob in L1AprilConfig.field_names()
    cfg = L1AprilConfig()
    assert cfg.grad_clip == 1.0 and cfg.l1_coefficient == 5.0 and cfg.l1_warmup_frac == 0.05
    assert (cfg.adam_beta1, cfg.adam_beta2) == (0.9, 0.999) and cfg.lr is None


def test_penalty_on_a_random_instance_matches_plain_arithmetic():
    sae = random_sae()
    x = batch(3)
    out = sae.loss(x, 10**6)
    w_enc, w_dec = sae.W_enc.detach(), sae.W_dec.detach()
    f = torch.clamp(x @ w_enc + sae.b_enc.detach(), min=0)
    norms = torch.sqrt((w_dec**2).sum(1))
    assert float(out.terms["l1"]) == pytest.approx(float((f * norms).sum() / len(x)), rel=1e-5)
    x_hat = f @ w_dec + sae.b_dec.detach()
    assert float(out.terms["mse"]) == pytest.approx(float(((x - x_hat) ** 2).sum() / len(x)))


def test_decoder_is_not_renormalised_after_a_step():
    sae = random_sae()
    x = batch(4)
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    norms0 = sae.W_dec.detach().norm(dim=-1).clone()
    for step in range(3):
        opt.zero_grad()
        sae.loss(x, step).total.backward()
        g = sae.W_dec.grad.clone()
        sae.before_optimizer_step()
        assert torch.equal(sae.W_dec.grad, g)  # no projection
        opt.step()
        w = sae.W_dec.detach().clone()
        sae.after_step()
        assert torch.equal(sae.W_dec.detach(), w)  # no renormalisation
    norms = sae.W_dec.detach().norm(dim=-1)
    assert (norms - norms0).abs().max() > 1e-2
    assert (norms - 1).abs().max() > 0.3


@pytest.mark.parametrize("scale", [3.7, 0.25])
def test_fold_input_scale(scale):
    trained = random_sae(seed=6)  # stands for an SAE trained on scale * x
    folded = copy.deepcopy(trained)
    folded.fold_input_scale(scale)
    x = batch(7, n=32)
    with torch.no_grad():
        f_scaled = trained.encode(scale * x)
        assert (f_scaled > 0).any() and (f_scaled == 0).any()
        assert torch.allclose(folded.encode(x), f_scaled / scale, atol=1e-5)
        assert torch.allclose(folded(x), trained(scale * x) / scale, atol=1e-5)
    assert torch.equal(folded.W_dec, trained.W_dec) and torch.equal(folded.W_enc, trained.W_enc)


def test_save_load_round_trip(tmp_path):
    sae = random_sae(seed=10)
    save_sae(sae, tmp_path / "sae", {})
    loaded, cfg = load_sae(tmp_path / "sae")
    assert isinstance(loaded, L1AprilSAE) and cfg["baseline"] == "l1_april"
    assert loaded.cfg.grad_clip == 1.0 and loaded.cfg.l1_coefficient == 0.5
    x = batch(11, n=16)
    with torch.no_grad():
        assert torch.equal(loaded(x), sae(x))


def test_on_train_start_leaves_the_biases_at_zero():
    torch.manual_seed(8)
    sae = L1AprilSAE(L1AprilConfig(d_in=8, d_sae=16))
    sae.on_train_start(500, 3.0 + batch(9))
    assert sae.total_steps == 500
    assert torch.equal(sae.b_dec, torch.zeros(8))


# --- a short training run on synthetic sparse data ---------------------------------------

D, N_DIRS, CTX = 64, 128, 17


def sparse_acts(n: int, seed: int) -> np.ndarray:
    """Sparse non-negative combinations of 128 fixed random unit directions, plus an
    offset, at a scale far from 1 (so the trainer's rescaling and the fold matter)."""
    dirs = np.random.default_rng(0).normal(size=(N_DIRS, D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    codes = (rng.random((n, N_DIRS)) < 3.5 / N_DIRS) * rng.uniform(0.5, 1.5, (n, N_DIRS))
    return (7.3 * (codes @ dirs + 0.2)).astype(np.float32)


def test_training_reconstructs_sparse_data(tmp_path):
    # Seen (400 steps of 128, lr 1e-2, lambda 0.5, d_sae 256, torch seed 0): explained
    # variance 0.924, L0 10.5, gamma 0.966; decoder row norms from 0.18 to 1.22.
    steps, batch_size = 400, 128
    n_win = steps * batch_size // (CTX - 1) + 1
    acts = sparse_acts(n_win * CTX, seed=1).reshape(n_win, CTX, D)
    store = ActivationStore(
        path=tmp_path,
        acts=acts,
        tokens=np.zeros((n_win, CTX), np.int32),
        mean=np.zeros(D, np.float32),
        meta={},
    )
    budget = BudgetSpec(train_tokens=steps * batch_size, batch_size=batch_size, d_sae=256, lr=1e-2)
    torch.manual_seed(0)
    cfg = L1AprilConfig(d_in=D, d_sae=256, l1_coefficient=0.5)
    sae = L1AprilSAE(cfg)
    rec = train(
        Member(
            sae,
            "l1_april",
            cfg.lr or budget.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            grad_clip=cfg.grad_clip,
        ),
        store,
        budget,
        seed=0,
    )
    sae.fold_input_scale(rec.input_scale)

    x = torch.from_numpy(sparse_acts(4000, seed=2))
    with torch.no_grad():
        f = sae.encode(x)
        x_hat = sae(x).double()
    x = x.double()
    ev = 1 - float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert ev > 0.8
    l0 = float((f > 0).sum(-1).double().mean())
    assert 1 < l0 < 64
    norms = sae.W_dec.detach().norm(dim=-1)
    assert (norms - 1).abs().max() > 0.1 and (norms - 0.1).abs().max() > 0.1
