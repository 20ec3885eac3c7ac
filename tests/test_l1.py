"""The standard L1 SAE (baselines/l1.py) against hand computations and invariants."""

from __future__ import annotations

import copy

import pytest
import torch

from dictbench.baselines.init import geometric_median
from dictbench.baselines.l1 import L1SAE, L1Config

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def hand_sae(coefficient: float = 2.0, warmup_frac: float = 0.1, total_steps: int = 100) -> L1SAE:
    """d_in = 2, d_sae = 3 with hand-set weights (unit decoder rows, W_enc = W_dec^T)."""
    sae = L1SAE(L1Config(d_in=2, d_sae=3, l1_coefficient=coefficient, l1_warmup_frac=warmup_frac))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.W_enc.copy_(sae.W_dec.t())
        sae.b_enc.copy_(torch.tensor([0.0, -0.5, 0.1]))
        sae.b_dec.copy_(torch.tensor([0.5, -0.5]))
    sae.total_steps = total_steps
    return sae


# By hand, for x1 = [1.5, 0.5], x2 = [0.5, -1.5]:
#   x1 - b_dec = [1, 1];  pre = [1, 1, 1.4] + b_enc = [1, 0.5, 1.5] -> f1 = [1, 0.5, 1.5]
#   x_hat1 = [1,0] + 0.5 [0,1] + 1.5 [0.6,0.8] + [0.5,-0.5] = [2.4, 1.2]; err^2 = .81 + .49
#   x2 - b_dec = [0, -1]; pre = [0, -1, -0.8] + b_enc = [0, -1.5, -0.7] -> f2 = 0
#   x_hat2 = b_dec = [0.5, -0.5]; err^2 = 0 + 1
HAND_X = torch.tensor([[1.5, 0.5], [0.5, -1.5]])
HAND_F = torch.tensor([[1.0, 0.5, 1.5], [0.0, 0.0, 0.0]])
HAND_XHAT = torch.tensor([[2.4, 1.2], [0.5, -0.5]])
HAND_MSE = (1.30 + 1.0) / 2  # sum over dims, mean over the batch
HAND_L1 = (3.0 + 0.0) / 2


def test_encode_decode_by_hand():
    sae = hand_sae()
    with torch.no_grad():
        f = sae.encode(HAND_X)
        assert torch.allclose(f, HAND_F, atol=1e-6)
        assert torch.allclose(sae.decode(f), HAND_XHAT, atol=1e-6)
        assert torch.allclose(sae(HAND_X), HAND_XHAT, atol=1e-6)


@pytest.mark.parametrize(
    "step, factor",
    [
        (50, 1.0),  # after the warm-up (int(0.1 * 100) = 10 steps)
        (10, 1.0),
        (9, 1.0),  # (9 + 1) / 10
        (4, 0.5),  # (4 + 1) / 10
        (0, 0.1),  # (0 + 1) / 10
    ],
)
def test_loss_terms_by_hand(step, factor):
    sae = hand_sae(coefficient=2.0, warmup_frac=0.1, total_steps=100)
    out = sae.loss(HAND_X, step)
    assert float(out.terms["mse"]) == pytest.approx(HAND_MSE, abs=1e-6)
    assert float(out.terms["l1"]) == pytest.approx(HAND_L1, abs=1e-6)
    assert float(out.total.detach()) == pytest.approx(HAND_MSE + 2.0 * factor * HAND_L1, abs=1e-6)
    assert torch.allclose(out.latents, HAND_F, atol=1e-6)


def test_no_warmup_when_fraction_is_zero():
    sae = hand_sae(coefficient=2.0, warmup_frac=0.0, total_steps=100)
    assert float(sae.loss(HAND_X, 0).total.detach()) == pytest.approx(
        HAND_MSE + 2.0 * HAND_L1, abs=1e-6
    )


def test_mse_does_not_depend_on_batch_size():
    sae = hand_sae()
    doubled = torch.cat([HAND_X, HAND_X, HAND_X])
    out = sae.loss(doubled, 50)
    assert float(out.terms["mse"]) == pytest.approx(HAND_MSE, abs=1e-6)
    assert float(out.terms["l1"]) == pytest.approx(HAND_L1, abs=1e-6)


def random_sae(d_in: int = 8, d_sae: int = 16, seed: int = 0) -> L1SAE:
    torch.manual_seed(seed)
    sae = L1SAE(L1Config(d_in=d_in, d_sae=d_sae, l1_coefficient=0.5))
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(d_sae))
        sae.b_dec.copy_(0.3 * torch.randn(d_in))
    return sae


def test_init_has_unit_decoder_rows_and_tied_encoder():
    torch.manual_seed(1)
    sae = L1SAE(L1Config(d_in=8, d_sae=16))
    assert sae.W_dec.shape == (16, 8) and sae.W_enc.shape == (8, 16)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(16), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()  # tied at init, not shared


def test_gradient_reaches_all_four_parameters():
    sae = random_sae()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    sae.loss(x, 10**6).total.backward()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        g = getattr(sae, name).grad
        assert g is not None, name
        assert torch.isfinite(g).all(), name
        assert g.abs().max() > 0, name


def test_before_optimizer_step_removes_the_radial_gradient():
    sae = random_sae()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    sae.loss(x, 10**6).total.backward()
    g_before = sae.W_dec.grad.clone()
    w = sae.W_dec.detach().clone()
    assert (g_before * w).sum(-1).abs().max() > 1e-3  # there was a radial part to remove
    sae.before_optimizer_step()
    g_after = sae.W_dec.grad
    assert (g_after * w).sum(-1).abs().max() < 1e-6
    # Only the radial part changed: the difference is parallel to each row.
    diff = g_before - g_after
    radial = (diff * w).sum(-1, keepdim=True) * w
    assert torch.allclose(diff, radial, atol=1e-6)
    # Other gradients are untouched.
    assert sae.W_enc.grad is not None


@pytest.mark.parametrize("opt_name", ["adam", "sgd"])
def test_decoder_rows_unit_norm_after_a_step(opt_name):
    sae = random_sae()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(4))
    w0 = sae.W_dec.detach().clone()
    opt = (
        torch.optim.Adam(sae.parameters(), lr=0.05)
        if opt_name == "adam"
        else torch.optim.SGD(sae.parameters(), lr=0.5)
    )
    for step in range(3):
        opt.zero_grad()
        sae.loss(x, step).total.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_step()
        norms = sae.W_dec.detach().norm(dim=-1)
        assert (norms - 1).abs().max() < 1e-6
    assert (sae.W_dec.detach() - w0).abs().max() > 1e-3  # the rows did move


def test_projected_sgd_step_keeps_norms_to_second_order():
    """Without after_step: a step along the tangent changes a unit row's norm by O(lr^2)."""
    sae = random_sae()
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(5))
    lr = 1e-3
    sae.loss(x, 10**6).total.backward()
    sae.before_optimizer_step()
    g = sae.W_dec.grad.clone()
    with torch.no_grad():
        sae.W_dec.sub_(lr * g)
    drift = (sae.W_dec.detach().double().norm(dim=-1) - 1).abs()
    # ||w - lr g_perp|| = sqrt(1 + lr^2 ||g_perp||^2) ~ 1 + lr^2 ||g_perp||^2 / 2
    bound = 0.5 * lr**2 * g.double().norm(dim=-1).pow(2) + 1e-6
    assert (drift <= bound).all()


@pytest.mark.parametrize("scale", [3.7, 0.25])
def test_fold_input_scale(scale):
    trained = random_sae(seed=6)  # stands for an SAE trained on scale * x
    folded = copy.deepcopy(trained)
    folded.fold_input_scale(scale)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        f_scaled = trained.encode(scale * x)
        assert (f_scaled > 0).any() and (f_scaled == 0).any()
        assert torch.allclose(folded.encode(x), f_scaled / scale, atol=1e-5)
        assert torch.allclose(
            folded.decode(folded.encode(x)), trained(scale * x) / scale, atol=1e-5
        )
        assert torch.allclose(folded(x), trained(scale * x) / scale, atol=1e-5)
    # Decoder rows keep unit norm (the constraint survives folding).
    assert torch.allclose(folded.W_dec.norm(dim=-1), torch.ones(16), atol=1e-6)


def sum_dist(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm(dim=-1).sum())


def test_on_train_start_puts_b_dec_at_the_geometric_median():
    g = torch.Generator().manual_seed(8)
    # Skewed sample: a cloud plus far outliers, so median and mean differ.
    sample = torch.cat([torch.randn(200, 8, generator=g), 50 + torch.randn(10, 8, generator=g)])
    sae = random_sae()
    w_dec = sae.W_dec.detach().clone()
    sae.on_train_start(1000, sample)
    assert sae.total_steps == 1000
    assert torch.equal(sae.W_dec.detach(), w_dec)
    med = sae.b_dec.detach().clone()
    best = sum_dist(sample, med)
    mean = sample.mean(0)
    assert (med - mean).norm() > 1.0
    assert best < sum_dist(sample, mean)
    for _ in range(8):
        u = torch.randn(8, generator=g)
        u = u / u.norm()
        for eps in (1e-2, 1e-1):
            assert sum_dist(sample, med + eps * u) > best
            assert sum_dist(sample, med - eps * u) > best


def test_geometric_median_of_a_symmetric_sample_is_the_centre():
    g = torch.Generator().manual_seed(9)
    centre = torch.tensor([1.0, -2.0, 3.0, 0.5])
    v = torch.randn(20, 4, generator=g) * torch.tensor([1.0, 5.0, 0.1, 2.0])
    sample = torch.cat([centre + v, centre - v])
    sae = random_sae(d_in=4, d_sae=6)
    sae.on_train_start(10, sample)
    assert torch.allclose(sae.b_dec.detach(), centre, atol=1e-5)


def test_geometric_median_of_collinear_points_is_their_median():
    """On a line the geometric median is the 1-D median, far from the mean here."""
    centre = torch.tensor([1.0, 2.0, 3.0, 4.0])
    u = torch.tensor([0.6, 0.8, 0.0, 0.0])
    t = torch.tensor([-1.0, 0.0, 0.5, 10.0, 100.0])
    sample = centre + t[:, None] * u
    assert torch.allclose(geometric_median(sample), centre + 0.5 * u, atol=1e-4)
