"""The TopK SAE (baselines/topk.py) and AuxK (baselines/auxk.py) against hand computations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from synthetic_sparse import ACTIVE, D, M, explained_variance_and_l0, sparse_data, sparse_store

from dictbench.baselines.auxk import auxk_loss
from dictbench.baselines.topk import TopKConfig, TopKSAE
from dictbench.registry import get_baseline
from dictbench.spec import BudgetSpec
from dictbench.train.lockstep import Member
from dictbench.train.trainer import train

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def set_params(sae, W_dec, b_enc, b_dec, W_enc=None):
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor(W_dec))
        sae.W_enc.copy_(torch.tensor(W_enc) if W_enc is not None else sae.W_dec.t())
        sae.b_enc.copy_(torch.tensor(b_enc))
        sae.b_dec.copy_(torch.tensor(b_dec))
    return sae


def random_sae(d_in=8, d_sae=16, k=4, seed=0, **kw) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(TopKConfig(d_in=d_in, d_sae=d_sae, k=k, **kw))
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(d_sae))
        sae.b_dec.copy_(0.3 * torch.randn(d_in))
    return sae


# --- interface -----------------------------------------------------------------------


def test_registered_with_saelens_shapes_and_knob():
    assert get_baseline("topk") is TopKSAE
    assert TopKSAE.sparsity_knob == "k" and "k" in TopKConfig.field_names()
    cfg = TopKConfig(d_in=8, d_sae=16)
    assert (cfg.k, cfg.aux_coefficient, cfg.dead_tokens_threshold) == (32, 1 / 32, 10_000_000)
    assert cfg.lr is None
    sae = TopKSAE(cfg)
    shapes = {k: tuple(v.shape) for k, v in sae.named_parameters()}
    assert shapes == {"W_enc": (8, 16), "W_dec": (16, 8), "b_enc": (16,), "b_dec": (8,)}
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(16), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert sae.k_aux == 4  # d_in // 2
    assert "tokens_since_fired" in sae.state_dict()
    x = torch.randn(5, 8)
    assert sae.encode(x).shape == (5, 16) and sae(x).shape == (5, 8)


# --- encoding ------------------------------------------------------------------------


def test_keeps_exactly_the_k_largest_when_all_preactivations_are_positive():
    sae = random_sae(d_in=8, d_sae=16, k=5, seed=1)
    with torch.no_grad():
        sae.b_enc.fill_(100.0)  # every pre-activation positive for these inputs
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    pre = ((x - sae.b_dec) @ sae.W_enc + sae.b_enc).detach().numpy()
    assert (pre > 0).all()
    with torch.no_grad():
        f = sae.encode(x).numpy()
    assert ((f != 0).sum(-1) == 5).all()
    want = np.zeros_like(pre)
    top = np.argsort(-pre, axis=-1)[:, :5]
    np.put_along_axis(want, top, np.take_along_axis(pre, top, -1), -1)
    np.testing.assert_allclose(f, want, rtol=1e-6)


# By hand, d_in = 2, d_sae = 3, k = 2, W_enc = W_dec^T:
#   x1 - b_dec = [1, 1]; pre = [1, 1, 1.4] + b_enc = [1, 0.5, 1.5] -> keep latents 2, 0
#   z1 = [1, 0, 1.5]; x_hat1 = [1, 0] + 1.5 [0.6, 0.8] + b_dec = [2.4, 0.7]; err^2 = .85
#   x2 - b_dec = [0, -1]; pre = [0, -1.5, -0.7]: top two are latents 0 and 2, both <= 0,
#   so the ReLU leaves nothing: z2 = 0, x_hat2 = b_dec; err^2 = 1
HAND = dict(W_dec=[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], b_enc=[0.0, -0.5, 0.1], b_dec=[0.5, -0.5])
HAND_X = torch.tensor([[1.5, 0.5], [0.5, -1.5]])


def test_encode_decode_and_mse_by_hand():
    sae = set_params(TopKSAE(TopKConfig(d_in=2, d_sae=3, k=2)), **HAND)
    with torch.no_grad():
        f = sae.encode(HAND_X)
        assert torch.allclose(f, torch.tensor([[1.0, 0.0, 1.5], [0.0, 0.0, 0.0]]), atol=1e-6)
        assert torch.allclose(sae(HAND_X), torch.tensor([[2.4, 0.7], [0.5, -0.5]]), atol=1e-6)
    out = sae.loss(HAND_X, 0)
    assert float(out.terms["mse"]) == pytest.approx((0.85 + 1.0) / 2, abs=1e-6)
    assert float(out.terms["auxk"]) == 0.0  # nothing dead
    assert float(out.total.detach()) == pytest.approx((0.85 + 1.0) / 2, abs=1e-6)
    assert out.latents is None  # no dense latent matrix: only which latents fired
    assert torch.equal(out.fired, (f > 0).any(0))


# --- AuxK ----------------------------------------------------------------------------

# d_in = 2, d_sae = 4, k = 1, W_enc = W_dec^T, b_dec = [0.5, -0.5], latents 2 and 3 dead:
#   x1 - b_dec = [2, 1]: pre = [2, 1, 1.8, 1.0]; live top-1 is latent 0: e1 = [0, 1]
#   x2 - b_dec = [1, 3]: pre = [1, 3, 2.8, -1.0]; latent 1: e2 = [1, 0]
#   (b_dec cancels in e and must not enter e_hat, so a nonzero one checks that)
#   mse = (1 + 1) / 2 = 1; var(e) over the batch = (0.5 + 0.5) / 2 = 0.5
#   k_aux = 1: e_hat1 = 1.8 d2 = [1.08, 1.44] -> |e1 - e_hat1|^2 = 1.36
#              e_hat2 = 2.8 d2 = [1.68, 2.24] -> 5.48;  aux = 3.42 / 0.5 = 6.84
#   k_aux = 2: e_hat1 = 1.8 d2 + 1.0 d3 = [1.88, 0.84] -> 3.56; token 2's second dead
#              pre-activation (-1) is zeroed by the ReLU -> 5.48;  aux = 4.52 / 0.5 = 9.04
#   The total weighs aux by 1/32 times the data's variance (the paper's weight against a
#   variance-normalised MSE): mean(x) = [2, 1.5], |x - mean|^2 = 1.25 for both tokens,
#   so total = mse + 1.25 * aux / 32.
DATA_VAR = 1.25
AUX = dict(
    W_dec=[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, -0.6]],
    b_enc=[0.0, 0.0, -0.2, 0.0],
    b_dec=[0.5, -0.5],
)
AUX_X = torch.tensor([[2.5, 0.5], [1.5, 2.5]])


def aux_sae(k_aux, coefficient=1 / 32, since=(100, 0, 100, 100)) -> TopKSAE:
    cfg = TopKConfig(
        d_in=2, d_sae=4, k=1, k_aux=k_aux, aux_coefficient=coefficient, dead_tokens_threshold=10
    )
    sae = set_params(TopKSAE(cfg), **AUX)
    # Latent 0 was silent for 100 tokens but fires on x1, so it is not dead.
    sae.tokens_since_fired.copy_(torch.tensor(since))
    return sae


@pytest.mark.parametrize("k_aux, want", [(1, 6.84), (2, 9.04), (50, 9.04)])
def test_auxk_loss_by_hand(k_aux, want):
    sae = aux_sae(k_aux)
    out = sae.loss(AUX_X, 0)
    assert torch.equal(sae.tokens_since_fired, torch.tensor([0, 0, 102, 102]))
    assert float(out.terms["mse"]) == pytest.approx(1.0, abs=1e-6)
    assert float(out.terms["auxk"]) == pytest.approx(want, rel=1e-5)
    assert float(out.total.detach()) == pytest.approx(1.0 + DATA_VAR * want / 32, rel=1e-6)


def test_auxk_is_zero_when_nothing_is_dead():
    sae = aux_sae(2, since=(0, 0, 5, 5))  # below the threshold of 10
    out = sae.loss(AUX_X, 0)
    assert float(out.terms["auxk"]) == 0.0
    assert float(out.total.detach()) == pytest.approx(1.0, abs=1e-6)


def test_eval_mode_does_not_count_tokens():
    sae = aux_sae(2).eval()
    sae.loss(AUX_X, 0)
    assert torch.equal(sae.tokens_since_fired, torch.tensor([100, 0, 100, 100]))


def test_dead_counter_counts_tokens_and_resets_on_firing():
    sae = aux_sae(2, since=(0, 0, 0, 0))
    for _ in range(3):
        sae.loss(AUX_X, 0)
    assert torch.equal(sae.tokens_since_fired, torch.tensor([0, 0, 6, 6]))
    # 12 tokens exceed a threshold of 10: latents 2 and 3 are dead from the 6th batch on.
    sae.loss(AUX_X, 0)
    sae.loss(AUX_X, 0)
    assert torch.equal(sae.dead_mask(), torch.tensor([False, False, False, False]))
    assert float(sae.loss(AUX_X, 0).terms["auxk"]) == pytest.approx(9.04, rel=1e-5)


def test_aux_gradient_reaches_only_the_dead_latents():
    """The gradient difference between coefficient 1 and 0 is the aux term's gradient."""
    grads = []
    for coefficient in (1.0, 0.0):
        sae = aux_sae(2, coefficient=coefficient)
        sae.loss(AUX_X, 0).total.backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    aux = {n: grads[0][n] - grads[1][n] for n in grads[0]}
    assert aux["W_enc"][:, :2].abs().max() == 0 and aux["W_enc"][:, 2:].abs().min() > 0
    assert aux["W_dec"][:2].abs().max() == 0 and aux["W_dec"][2:].abs().min() > 0
    assert aux["b_enc"][:2].abs().max() == 0 and aux["b_enc"][2:].abs().min() > 0


def aux_reference(pre, e, dead, k_aux, W_dec):
    """Loops in float64: top-k_aux dead pre-activations per token, ReLU, no b_dec."""
    pre, e, W_dec = (np.asarray(t, dtype=np.float64) for t in (pre, e, W_dec))
    dead_idx = np.flatnonzero(dead)
    k = min(k_aux, len(dead_idx))
    if k == 0:
        return 0.0
    num = 0.0
    for b in range(pre.shape[0]):
        chosen = dead_idx[np.argsort(-pre[b, dead_idx])[:k]]
        e_hat = sum(max(pre[b, i], 0.0) * W_dec[i] for i in chosen)
        num += np.sum((e[b] - e_hat) ** 2)
    den = np.sum((e - e.mean(0)) ** 2)
    return num / den


@pytest.mark.parametrize("k_aux", [1, 3, 7, 40])
def test_auxk_loss_matches_a_reference_on_random_inputs(k_aux):
    g = torch.Generator().manual_seed(k_aux)
    pre, e = torch.randn(16, 24, generator=g), torch.randn(16, 6, generator=g)
    W_dec = torch.randn(24, 6, generator=g)
    dead = torch.rand(24, generator=g) < 0.4
    got = float(auxk_loss(pre, e, dead, k_aux, W_dec))
    assert got == pytest.approx(aux_reference(pre, e, dead.numpy(), k_aux, W_dec), rel=1e-5)
    assert float(auxk_loss(pre, e, torch.zeros(24, dtype=torch.bool), k_aux, W_dec)) == 0.0


# --- constraints, init, folding ----------------------------------------------------------


def test_decoder_rows_unit_norm_after_adam_steps():
    sae = random_sae(k=4, seed=3)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(4))
    w0 = sae.W_dec.detach().clone()
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    for step in range(3):
        opt.zero_grad()
        sae.loss(x, step).total.backward()
        sae.before_optimizer_step()
        w = sae.W_dec.detach()
        assert (sae.W_dec.grad * w).sum(-1).abs().max() < 1e-5  # no radial component
        opt.step()
        sae.after_step()
        assert (sae.W_dec.detach().norm(dim=-1) - 1).abs().max() < 1e-6
    assert (sae.W_dec.detach() - w0).abs().max() > 1e-3


def test_on_train_start_puts_b_dec_at_the_centre_of_a_symmetric_sample():
    g = torch.Generator().manual_seed(5)
    centre = torch.tensor([1.0, -2.0, 3.0, 0.5])
    v = torch.randn(20, 4, generator=g) * torch.tensor([1.0, 5.0, 0.1, 2.0])
    sae = random_sae(d_in=4, d_sae=6, k=2)
    sae.on_train_start(10, torch.cat([centre + v, centre - v]))
    assert sae.total_steps == 10
    assert torch.allclose(sae.b_dec.detach(), centre, atol=1e-5)


@pytest.mark.parametrize("scale", [3.7, 0.25])
def test_fold_input_scale(scale):
    trained = random_sae(k=4, seed=6)  # stands for an SAE trained on scale * x
    folded = copy.deepcopy(trained)
    folded.fold_input_scale(scale)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        f_scaled = trained.encode(scale * x)
        assert (f_scaled > 0).any()
        assert torch.allclose(folded.encode(x), f_scaled / scale, atol=1e-5)
        assert torch.allclose(folded(x), trained(scale * x) / scale, atol=1e-5)
    assert torch.allclose(folded.W_dec.norm(dim=-1), torch.ones(16), atol=1e-6)


# --- a short training run ------------------------------------------------------------------


def test_training_on_sparse_synthetic_data(tmp_path):
    budget = BudgetSpec(train_tokens=400 * 512, batch_size=512, d_sae=M, lr=1e-2)
    store = sparse_store(tmp_path, budget.train_tokens)
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=D, d_sae=M, k=ACTIVE, dead_tokens_threshold=8192))
    rec = train(Member(sae, "topk", budget.lr), store, budget, seed=0)
    assert rec.steps == 400 and rec.input_scale != 1.0
    assert set(rec.final_terms) == {"total", "mse", "auxk"}
    sae.fold_input_scale(rec.input_scale)
    sae.eval()
    x = torch.from_numpy(sparse_data(4096, seed=99))  # held out
    ev, l0 = explained_variance_and_l0(sae, x)
    assert ev > 0.8
    assert l0 <= ACTIVE
