"""The JumpReLU SAE (baselines/jumprelu.py): forward, STE gradients and units by hand."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from synthetic_sparse import D, M, explained_variance_and_l0, sparse_data, sparse_store

from dictbench.baselines.jumprelu import JumpReLUConfig, JumpReLUFn, JumpReLUSAE, StepFn
from dictbench.io.sae_io import load_sae, save_sae
from dictbench.registry import get_baseline
from dictbench.spec import BudgetSpec
from dictbench.train.lockstep import Member
from dictbench.train.trainer import train

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def set_params(sae, W_dec, b_enc, b_dec, theta, W_enc=None):
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor(W_dec))
        sae.W_enc.copy_(torch.tensor(W_enc) if W_enc is not None else sae.W_dec.t())
        sae.b_enc.copy_(torch.tensor(b_enc))
        sae.b_dec.copy_(torch.tensor(b_dec))
        sae.log_threshold.copy_(torch.tensor(theta).log())
    return sae


def random_sae(d_in=8, d_sae=16, seed=0, **kw) -> JumpReLUSAE:
    torch.manual_seed(seed)
    sae = JumpReLUSAE(JumpReLUConfig(d_in=d_in, d_sae=d_sae, **kw))
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(d_sae))
        sae.b_dec.copy_(0.3 * torch.randn(d_in))
        sae.log_threshold.copy_((0.5 + 0.3 * torch.rand(d_sae)).log())
    return sae


def test_registered_with_saelens_names_and_paper_defaults():
    assert get_baseline("jumprelu") is JumpReLUSAE
    assert JumpReLUSAE.sparsity_knob == "l0_coefficient"
    assert "l0_coefficient" in JumpReLUConfig.field_names()
    cfg = JumpReLUConfig(d_in=16, d_sae=32)
    assert (cfg.bandwidth, cfg.init_threshold, cfg.adam_beta1, cfg.adam_beta2) == (
        0.001,
        0.001,
        0.0,
        0.999,
    )
    sae = JumpReLUSAE(cfg)
    shapes = {k: tuple(v.shape) for k, v in sae.named_parameters()}
    assert shapes == {
        "W_dec": (32, 16),
        "W_enc": (16, 32),
        "b_enc": (32,),
        "b_dec": (16,),
        "log_threshold": (32,),
    }
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(32), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    # Paper units -> ours: theta_init and eps times sqrt(E||x||^2) = sqrt(d_in) = 4.
    assert torch.allclose(sae.threshold, torch.full((32,), 0.004), rtol=1e-6)
    assert sae.eps == pytest.approx(0.004)
    x = torch.randn(5, 16)
    assert sae.encode(x).shape == (5, 32) and sae(x).shape == (5, 16)


# --- forward and loss by hand --------------------------------------------------------------

# d_in = 2, d_sae = 3, W_enc = W_dec^T, theta = [0.5, 0.4, 2.0]:
#   x1 - b_dec = [1, 1]; pre = [1, 0.5, 1.5]: 1 > .5, .5 > .4, 1.5 < 2 -> f1 = [1, 0.5, 0]
#   x_hat1 = [1, 0] + 0.5 [0, 1] + b_dec = [1.5, 0]; err^2 = 0.25
#   x2 - b_dec = [0, -1]; pre = [0, -1.5, -0.7] -> f2 = 0; x_hat2 = b_dec; err^2 = 1
#   mse = 0.625, l0 = (2 + 0) / 2 = 1
HAND = dict(
    W_dec=[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]],
    b_enc=[0.0, -0.5, 0.1],
    b_dec=[0.5, -0.5],
    theta=[0.5, 0.4, 2.0],
)
HAND_X = torch.tensor([[1.5, 0.5], [0.5, -1.5]])


def hand_sae(coefficient=0.1, warmup_frac=0.0, input_rms=1.0, bandwidth=0.001) -> JumpReLUSAE:
    cfg = JumpReLUConfig(
        d_in=2, d_sae=3, l0_coefficient=coefficient, l0_warmup_frac=warmup_frac, bandwidth=bandwidth
    )
    sae = set_params(JumpReLUSAE(cfg), **HAND)
    sae.input_rms = input_rms
    sae.total_steps = 100
    return sae


def test_forward_by_hand():
    sae = hand_sae()
    with torch.no_grad():
        f = sae.encode(HAND_X)
        assert torch.allclose(f, torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 0.0]]), atol=1e-6)
        assert torch.allclose(sae(HAND_X), torch.tensor([[1.5, 0.0], [0.5, -0.5]]), atol=1e-6)


@pytest.mark.parametrize(
    "input_rms, step, want_lambda",
    [
        (1.0, 50, 0.1),  # paper units
        (2.0, 50, 0.4),  # E||x||^2 = 4: the squared error is 4x larger, so is lambda
        (1.0, 4, 0.05),  # warm-up over int(0.1 * 100) = 10 steps: (4 + 1) / 10
    ],
)
def test_loss_terms_by_hand(input_rms, step, want_lambda):
    sae = hand_sae(coefficient=0.1, warmup_frac=0.1, input_rms=input_rms)
    out = sae.loss(HAND_X, step)
    assert float(out.terms["mse"]) == pytest.approx(0.625, abs=1e-6)
    assert float(out.terms["l0"]) == pytest.approx(1.0, abs=1e-6)
    assert float(out.total.detach()) == pytest.approx(0.625 + want_lambda * 1.0, abs=1e-6)
    assert torch.equal(out.latents, sae.encode(HAND_X).detach())


def test_l0_term_counts_active_latents():
    sae = random_sae(seed=1)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach().numpy()
    theta = np.exp(sae.log_threshold.detach().numpy())
    count = (pre > theta).sum(-1).mean()
    assert 0 < count < 16
    out = sae.loss(x, 10**6)
    assert float(out.terms["l0"]) == pytest.approx(count, abs=1e-6)
    assert float((out.latents != 0).sum(-1).float().mean()) == pytest.approx(count, abs=1e-6)


# --- straight-through estimators ------------------------------------------------------------

# theta = 0.5 everywhere, eps = 0.1: the kernel window is |pre - theta| < 0.05.
STE_PRE = torch.tensor([[0.1, 0.53, 0.47, 0.56, 0.9], [0.52, 0.2, 0.9, 0.54, 0.46]])
STE_UP = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
# In the window: row 1 latents 1, 2 (upstream 2, 3); row 2 latents 0, 3, 4 (upstream 1).
# Summed upstream gradient in the window, per latent: [1, 2, 3, 1, 1].


def ste_grads(fn):
    pre = STE_PRE.clone().requires_grad_(True)
    theta = torch.full((5,), 0.5, requires_grad=True)
    out = fn.apply(pre, theta, 0.1)
    (out * STE_UP).sum().backward()
    return out.detach(), pre.grad, theta.grad


def test_jumprelu_ste_by_hand():
    out, g_pre, g_theta = ste_grads(JumpReLUFn)
    assert torch.allclose(out, torch.tensor([[0, 0.53, 0, 0.56, 0.9], [0.52, 0, 0.9, 0.54, 0]]))
    # d/dpre = H(pre - theta): the ordinary derivative where active, zero elsewhere.
    assert torch.allclose(g_pre, torch.tensor([[0.0, 2, 0, 4, 5], [1, 0, 1, 1, 0]]))
    # d/dtheta = -(theta / eps) K = -5 inside the window, 0 outside (0.1, 0.56, 0.9, 0.2).
    assert torch.allclose(g_theta, -5.0 * torch.tensor([1.0, 2, 3, 1, 1]), atol=1e-5)


def test_step_ste_by_hand():
    out, g_pre, g_theta = ste_grads(StepFn)
    assert torch.equal(out, torch.tensor([[0.0, 1, 0, 1, 1], [1, 0, 1, 1, 0]]))
    assert g_pre is None or g_pre.abs().max() == 0  # no gradient to the pre-activation
    assert torch.allclose(g_theta, -10.0 * torch.tensor([1.0, 2, 3, 1, 1]), atol=1e-4)


def window_sae() -> JumpReLUSAE:
    """d_in = d_sae = 2, identity weights, zero biases, theta = 0.5, eps = 0.1, lambda 2."""
    sae = JumpReLUSAE(
        JumpReLUConfig(d_in=2, d_sae=2, l0_coefficient=2.0, bandwidth=0.1, l0_warmup_frac=0.0)
    )
    eye = [[1.0, 0.0], [0.0, 1.0]]
    set_params(sae, W_dec=eye, b_enc=[0.0, 0.0], b_dec=[0.0, 0.0], theta=[0.5, 0.5])
    sae.input_rms = 1.0
    return sae


def test_log_threshold_gradient_through_the_loss_by_hand():
    # x = [0.53, 0.47]: f = [0.53, 0], x_hat - x = [0, -0.47], mse = 0.2209, l0 = 1.
    # d mse / d f = 2 (x_hat - x) = [0, -0.94]; both pre-activations are in the window.
    # d total / d theta = -(theta/eps) * [0, -0.94] + lambda * -(1/eps) = [-20, 4.7 - 20]
    # d total / d log theta = theta * that = [-10, -7.65]
    sae = window_sae()
    out = sae.loss(torch.tensor([[0.53, 0.47]]), 0)
    assert float(out.total.detach()) == pytest.approx(0.2209 + 2.0, abs=1e-5)
    out.total.backward()
    assert torch.allclose(sae.log_threshold.grad, torch.tensor([-10.0, -7.65]), atol=1e-4)
    # The L0 term gives the encoder nothing, and the reconstruction gradient on the
    # active latent is zero here, so the encoder's gradient is exactly zero.
    assert sae.b_enc.grad.abs().max() == 0 and sae.W_enc.grad.abs().max() == 0


def test_no_threshold_gradient_outside_the_window():
    sae = window_sae()
    sae.loss(torch.tensor([[0.9, 0.1]]), 0).total.backward()
    assert sae.log_threshold.grad.abs().max() == 0


# --- units, constraints, folding ------------------------------------------------------------


def test_on_train_start_converts_paper_units_with_the_sample_scale():
    sae = random_sae(d_in=4, d_sae=6)
    g = torch.Generator().manual_seed(3)
    sample = torch.randn(100, 4, generator=g)
    sample = 3.0 * sample / sample.norm(dim=-1, keepdim=True)  # E||x||^2 = 9
    sae.on_train_start(200, sample)
    assert sae.total_steps == 200
    assert torch.allclose(sae.threshold, torch.full((6,), 0.003), rtol=1e-5)
    assert sae.eps == pytest.approx(0.003, rel=1e-6)
    x = torch.randn(16, 4, generator=g)
    out = sae.loss(x, 10**6)
    lam = sae.cfg.l0_coefficient * 9.0
    penalty = float(out.total.detach() - out.terms["mse"])
    assert penalty == pytest.approx(lam * float(out.terms["l0"]), rel=1e-5)


def test_decoder_rows_unit_norm_after_adam_steps():
    sae = random_sae(seed=4)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(5))
    w0 = sae.W_dec.detach().clone()
    opt = torch.optim.Adam(sae.parameters(), lr=0.05, betas=(0.0, 0.999))
    for step in range(3):
        opt.zero_grad()
        sae.loss(x, step).total.backward()
        sae.before_optimizer_step()
        assert (sae.W_dec.grad * sae.W_dec.detach()).sum(-1).abs().max() < 1e-5
        opt.step()
        sae.after_step()
        assert (sae.W_dec.detach().norm(dim=-1) - 1).abs().max() < 1e-6
    assert (sae.W_dec.detach() - w0).abs().max() > 1e-3


@pytest.mark.parametrize("scale", [3.7, 0.25])
def test_fold_input_scale(scale):
    trained = random_sae(seed=6)  # stands for an SAE trained on scale * x
    folded = copy.deepcopy(trained)
    folded.fold_input_scale(scale)
    assert torch.allclose(folded.threshold, trained.threshold / scale, rtol=1e-5)
    assert folded.eps == pytest.approx(trained.eps / scale)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        f_scaled = trained.encode(scale * x)
        assert (f_scaled > 0).any() and (f_scaled == 0).any()
        assert torch.allclose(folded.encode(x), f_scaled / scale, atol=1e-5)
        assert torch.allclose(folded(x), trained(scale * x) / scale, atol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    sae = random_sae(seed=8)
    save_sae(sae, tmp_path / "sae", {})
    loaded, _ = load_sae(tmp_path / "sae")
    assert isinstance(loaded, JumpReLUSAE)
    assert torch.equal(loaded.log_threshold, sae.log_threshold)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(loaded(x), sae(x))


# --- a short training run ------------------------------------------------------------------


def test_training_on_sparse_synthetic_data(tmp_path):
    # lambda in paper units. The threshold starts at 0.001 (paper units) and must climb
    # about 4 e-folds; Adam moves log_threshold ~lr per step, hence the large rate here.
    budget = BudgetSpec(train_tokens=400 * 512, batch_size=512, d_sae=M, lr=3e-2)
    store = sparse_store(tmp_path, budget.train_tokens)
    torch.manual_seed(0)
    cfg = JumpReLUConfig(d_in=D, d_sae=M, l0_coefficient=0.01)
    sae = JumpReLUSAE(cfg)
    rec = train(Member(sae, "jumprelu", budget.lr, betas=(cfg.adam_beta1, 0.999)), store, budget, 0)
    assert set(rec.final_terms) == {"total", "mse", "l0"}
    assert sae.input_rms == pytest.approx(math.sqrt(D), rel=0.05)  # the trainer's scaling
    sae.fold_input_scale(rec.input_scale)
    sae.eval()
    x = torch.from_numpy(sparse_data(4096, seed=99))  # held out
    ev, l0 = explained_variance_and_l0(sae, x)
    assert ev > 0.8
    assert 2.5 <= l0 <= 10  # the data has 5 active directions per token; dense would be ~64
