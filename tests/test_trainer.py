"""The shared training loop (bench/train/trainer.py): schedule, token order, scaling, guards.

The synthetic store encodes each token's flat index (window * ctx + position) in
activation column 0, so every batch the trainer hands an SAE can be traced back
to the tokens it came from.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dictbench.baselines.base import LossOutput
from dictbench.baselines.l1 import L1SAE, L1Config
from dictbench.data.cache import ActivationStore
from dictbench.spec import BudgetSpec
from dictbench.train import trainer
from dictbench.train.lockstep import Member
from dictbench.train.trainer import TrainingFailed, activation_scale, lr_factor, token_order, train

pytestmark = pytest.mark.usefixtures("torch_one_thread")

N_WIN, CTX, D = 6, 9, 4
N_KEPT = N_WIN * (CTX - 1)  # 48
SPECIAL = 1e4  # position-0 activations: a huge outlier like a real BOS


def make_store(tmp_path) -> ActivationStore:
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(N_WIN, CTX, D)).astype(np.float32)
    acts[..., 0] = np.arange(N_WIN * CTX, dtype=np.float32).reshape(N_WIN, CTX)
    acts[:, 0, :] = SPECIAL
    tokens = rng.integers(0, 256, size=(N_WIN, CTX)).astype(np.int32)
    tokens[:, 0] = 256
    mean = acts[:, 1:].reshape(-1, D).mean(0)
    return ActivationStore(path=tmp_path, acts=acts, tokens=tokens, mean=mean, meta={})


def kept_rows(store: ActivationStore) -> np.ndarray:
    return np.asarray(store.acts[:, 1:]).reshape(-1, D).astype(np.float64)


# --- lr_factor ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "step, want",
    [
        (0, 0.1),  # warm-up start: (0 + 1) / 10
        (4, 0.5),
        (9, 1.0),  # last warm-up step reaches the plateau
        (10, 1.0),
        (50, 1.0),
        (79, 1.0),
        (80, 1.0),  # decay start: (100 - 80) / 20
        (90, 0.5),
        (99, 0.05),  # decay end: (100 - 99) / 20
    ],
)
def test_lr_factor_by_hand(step, want):
    assert lr_factor(step, 100, 0.1, 0.2) == pytest.approx(want, abs=1e-12)


def test_lr_factor_without_warmup_or_decay_is_constant():
    assert all(lr_factor(s, 50, 0.0, 0.0) == 1.0 for s in range(50))


def test_lr_factor_is_monotone_in_each_phase():
    f = [lr_factor(s, 200, 0.05, 0.2) for s in range(200)]
    assert f[:10] == sorted(f[:10])
    assert f[160:] == sorted(f[160:], reverse=True)
    assert all(0.0 < v <= 1.0 for v in f)


# --- token_order / activation_scale ------------------------------------------------------


def test_token_order_is_a_permutation_of_the_kept_tokens(tmp_path):
    store = make_store(tmp_path)
    order = token_order(store, seed=3)
    assert len(order) == N_KEPT
    assert not np.any(order % CTX == 0)  # never a special position
    want = np.array([w * CTX + p for w in range(N_WIN) for p in range(1, CTX)])
    assert np.array_equal(np.sort(order), want)
    assert not np.array_equal(order, want)  # actually shuffled


def test_token_order_depends_only_on_the_seed(tmp_path):
    store = make_store(tmp_path)
    a, b = token_order(store, seed=3), token_order(store, seed=3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, token_order(store, seed=4))


def test_activation_scale_normalises_the_mean_squared_norm(tmp_path):
    store = make_store(tmp_path)
    s = activation_scale(store, token_order(store, seed=1))
    x = kept_rows(store)  # special positions excluded: SPECIAL would dominate otherwise
    assert np.mean(np.sum((s * x) ** 2, axis=-1)) == pytest.approx(D, rel=1e-6)


def test_activation_scale_uses_the_first_n_of_the_order(tmp_path):
    store = make_store(tmp_path)
    order = token_order(store, seed=1)
    s = activation_scale(store, order, n=10)
    x = np.asarray(store.acts).reshape(-1, D)[order[:10]].astype(np.float64)
    assert s == pytest.approx(math.sqrt(D / np.mean(np.sum(x**2, axis=-1))), rel=1e-6)


# --- train() -----------------------------------------------------------------------


def recording(sae, log: list[torch.Tensor], nan_at: int | None = None, latents_fn=None):
    """Wraps ``sae.loss`` to record every batch it receives (and optionally misbehave)."""
    real = sae.loss

    def loss(batch: torch.Tensor, step: int) -> LossOutput:
        log.append(batch.detach().clone())
        out = real(batch, step)
        if nan_at is not None and step == nan_at:
            out = LossOutput(out.total * float("nan"), out.terms, out.latents)
        if latents_fn is not None:
            out = LossOutput(out.total, out.terms, latents_fn(step, batch.shape[0]))
        return out

    sae.loss = loss
    return sae


def l1_sae(coefficient: float, seed: int, d_sae: int = 8) -> L1SAE:
    torch.manual_seed(seed)
    return L1SAE(L1Config(d_in=D, d_sae=d_sae, l1_coefficient=coefficient))


BUDGET = BudgetSpec(train_tokens=40, batch_size=8, d_sae=8, lr=1e-3)


@pytest.mark.parametrize("normalize", [True, False])
def test_two_saes_see_the_same_batches(tmp_path, normalize):
    store = make_store(tmp_path)
    budget = BudgetSpec(train_tokens=43, batch_size=8, d_sae=8, normalize_activations=normalize)
    log_a: list[torch.Tensor] = []
    log_b: list[torch.Tensor] = []
    rec_a = train(Member(recording(l1_sae(1.0, 0), log_a), "a", 1e-3), store, budget, seed=5)
    rec_b = train(Member(recording(l1_sae(30.0, 1), log_b), "b", 1e-2), store, budget, seed=5)

    steps = 43 // 8
    assert rec_a.steps == rec_b.steps == steps
    assert rec_a.tokens == rec_b.tokens == steps * 8
    assert len(log_a) == len(log_b) == steps
    assert all(a.shape == (8, D) for a in log_a)
    assert all(torch.equal(a, b) for a, b in zip(log_a, log_b, strict=True))
    assert [float(a.sum()) for a in log_a] == [float(b.sum()) for b in log_b]

    # Trace the rows back to tokens: distinct, never special, in the seeded order.
    x = kept_rows(store)
    s_want = math.sqrt(D / np.mean(np.sum(x**2, axis=-1))) if normalize else 1.0
    assert rec_a.input_scale == pytest.approx(s_want, rel=1e-6)
    seen = torch.cat(log_a).double() / rec_a.input_scale
    idx = torch.round(seen[:, 0]).long().numpy()
    assert np.allclose(seen[:, 0].numpy(), idx, atol=1e-3)
    assert not np.any(idx % CTX == 0)
    assert len(set(idx.tolist())) == steps * 8
    assert np.array_equal(idx, token_order(store, 5)[: steps * 8])
    flat = np.asarray(store.acts).reshape(-1, D)
    assert np.allclose(seen.numpy(), flat[idx], atol=1e-4)


def test_another_seed_gives_other_batches(tmp_path):
    store = make_store(tmp_path)
    log_a: list[torch.Tensor] = []
    log_b: list[torch.Tensor] = []
    train(Member(recording(l1_sae(1.0, 0), log_a), "a", 1e-3), store, BUDGET, seed=5)
    train(Member(recording(l1_sae(1.0, 0), log_b), "b", 1e-3), store, BUDGET, seed=6)
    assert not torch.equal(torch.cat(log_a), torch.cat(log_b))
    assert torch.cat(log_b).shape == (40, D)


def test_nan_loss_raises_training_failed_naming_sae_and_step(tmp_path):
    store = make_store(tmp_path)
    log: list[torch.Tensor] = []
    sae = recording(l1_sae(1.0, 0), log, nan_at=2)
    with pytest.raises(TrainingFailed) as e:
        train(Member(sae, "l1-lambda7", 1e-3), store, BUDGET, seed=5)
    msg = str(e.value)
    assert "l1-lambda7" in msg
    assert "step 2" in msg
    assert len(log) == 3  # stopped at the bad step


def test_budget_larger_than_cache_raises(tmp_path):
    store = make_store(tmp_path)
    budget = BudgetSpec(train_tokens=N_KEPT + 8, batch_size=8, d_sae=8)
    with pytest.raises(TrainingFailed) as e:
        train(Member(l1_sae(1.0, 0), "big", 1e-3), store, budget, seed=5)
    assert "big" in str(e.value) and str(N_KEPT) in str(e.value)


def test_dead_latents_counted_over_the_last_quarter(tmp_path):
    """Latent j fires only at step j: the window (steps 6, 7 of 8) sees latents 6 and 7."""
    store = make_store(tmp_path)
    d_sae = 16

    def one_hot(step: int, n: int) -> torch.Tensor:
        lat = torch.zeros(n, d_sae)
        lat[0, step] = 1.0
        return lat

    log: list[torch.Tensor] = []
    sae = recording(l1_sae(1.0, 0, d_sae=d_sae), log, latents_fn=one_hot)
    budget = BudgetSpec(train_tokens=40, batch_size=5, d_sae=d_sae)
    rec = train(Member(sae, "dead", 1e-3), store, budget, seed=5)
    assert rec.steps == 8
    assert rec.train_dead_window_tokens == (8 - 6) * 5
    assert rec.train_frac_dead == pytest.approx((d_sae - 2) / d_sae)


def test_dead_latents_from_a_fired_mask_alone(tmp_path):
    """A method may report only which latents fired (LossOutput.fired, no latents):
    latent j fires only at step j, so the window (steps 6, 7 of 8) sees 6 and 7."""
    store = make_store(tmp_path)
    d_sae = 16
    sae = l1_sae(1.0, 0, d_sae=d_sae)
    real = sae.loss

    def loss(batch: torch.Tensor, step: int) -> LossOutput:
        out = real(batch, step)
        fired = torch.zeros(d_sae, dtype=torch.bool)
        fired[step] = True
        return LossOutput(out.total, out.terms, fired=fired)

    sae.loss = loss
    budget = BudgetSpec(train_tokens=40, batch_size=5, d_sae=d_sae)
    rec = train(Member(sae, "dead", 1e-3), store, budget, seed=5)
    assert rec.train_frac_dead == pytest.approx((d_sae - 2) / d_sae)


def test_sae_decoder_constraint_holds_after_training(tmp_path):
    store = make_store(tmp_path)
    sae = l1_sae(1.0, 0)
    train(Member(sae, "l1", 1e-2), store, BUDGET, seed=5)
    assert torch.allclose(sae.W_dec.detach().norm(dim=-1), torch.ones(8), atol=1e-6)


def _adam_first_step(p0: torch.Tensor, g: torch.Tensor, lr: float, eps: float = 1e-8):
    """Adam's first update in closed form: the bias-corrected moments are g and g^2."""
    p0, g = p0.double(), g.double()
    return p0 - lr * g / (g.abs() + eps)


def test_a_transposed_parameter_with_a_relaid_gradient_gets_the_right_adam_step():
    """A method hook may replace ``p.grad`` with a tensor in another layout; the fused
    kernel would then pair the wrong elements (on CPU silently), so the trainer relays it."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4).t().clone())  # strides (1, 4), like W_enc
    assert w.stride() != (6, 1)
    p0 = w.detach().clone()
    g = torch.randn(4, 6)

    class Hooked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = w

        def before_optimizer_step(self) -> None:
            self.w.grad = g.clone()  # contiguous: not the parameter's layout

    opt = trainer.make_optimizer([w], lr=0.1, betas=(0.9, 0.999))
    w.grad = torch.zeros_like(w)
    trainer.apply_update(Hooked(), opt, None)
    assert torch.allclose(w.detach().double(), _adam_first_step(p0, g, 0.1), atol=1e-6)


def test_align_layouts_gives_each_gradient_its_parameters_strides():
    p = torch.nn.Parameter(torch.randn(3, 5).t().clone())
    q = torch.nn.Parameter(torch.randn(5))
    g = torch.randn(5, 3)
    p.grad, q.grad = g.clone(), None
    opt = torch.optim.SGD([p, q], lr=0.1)
    trainer.align_layouts(opt)
    assert p.grad.stride() == p.stride() and torch.equal(p.grad, g)
    assert q.grad is None


def test_the_trainer_uses_the_fused_adam_kernel_where_torch_has_one():
    opt = trainer.make_optimizer([torch.nn.Parameter(torch.zeros(3))], 1e-3, (0.9, 0.999))
    has_cpu_kernel = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)
    assert bool(opt.defaults.get("fused")) == has_cpu_kernel
    # Elsewhere the loop: torch would accept fused=True and fail at the first step.
    meta = torch.nn.Parameter(torch.zeros(3, device="meta"))
    assert not trainer.make_optimizer([meta], 1e-3, (0.9, 0.999)).defaults.get("fused")
    assert trainer._has_fused_adam({"cuda"}) and not trainer._has_fused_adam({"cpu", "cuda"})
