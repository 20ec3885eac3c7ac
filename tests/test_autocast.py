"""``budget.autocast: bfloat16``: the training loss under torch.autocast.

Two separate claims. (1) Under autocast the fused/sparse kernels step aside for their
plain formulas; those fallbacks are exact, checked in float32 by forcing them and
comparing with the fast paths. (2) Under real bf16 autocast every local baseline's
loss and gradients stay close to float32 (bf16 keeps 8 significant bits, ~0.4%
relative per rounding) and the gradients come back float32 for the float32 weights.
"""

from __future__ import annotations

import pytest
import torch

from dictbench import registry
from dictbench.baselines import dense_ops, gated, sparse_ops
from dictbench.errors import SpecError
from dictbench.spec import BudgetSpec
from dictbench.train.lockstep import Member
from dictbench.train.trainer import autocast, train
from tests.method_names import local_methods
from tests.test_trainer import make_store

pytestmark = pytest.mark.usefixtures("torch_one_thread")

D_IN, D_SAE, B = 16, 64, 96
LOCAL = local_methods()  # every registered method that trains on activations alone


def build(method: str, sparse_bias: float = 0.0):
    torch.manual_seed(0)
    cls = registry.get_baseline(method)
    fields = cls.config_class.__dataclass_fields__
    extra = {"k": 6} if "k" in fields else {}
    if "l1_warmup_frac" in fields:
        extra["l1_warmup_frac"] = 0.0
    sae = cls(cls.config_class(d_in=D_IN, d_sae=D_SAE, **extra))
    sae.train()
    x = torch.randn(B, D_IN, generator=torch.Generator().manual_seed(1)) * 1.3 + 0.2
    sae.on_train_start(100, x)
    with torch.no_grad():
        for name in ("b_enc", "b_gate", "b_mag"):
            if hasattr(sae, name):
                getattr(sae, name).normal_(generator=torch.Generator().manual_seed(2))
                getattr(sae, name).add_(sparse_bias)
    return sae, x


def loss_and_grads(sae, x: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    sae.zero_grad(set_to_none=True)
    out = sae.loss(x, 50)
    out.total.backward()
    grads = {n: p.grad for n, p in sae.named_parameters() if p.grad is not None}
    return float(out.total.detach()), grads


@pytest.mark.parametrize("sparse_bias", [0.0, -2.0])  # dense and sparse fast paths
@pytest.mark.parametrize("method", LOCAL)
def test_plain_fallbacks_equal_the_fast_paths(method, sparse_bias, monkeypatch):
    monkeypatch.setattr(dense_ops, "SPARSE_MAX_DENSITY", 0.05)
    sae, x = build(method, sparse_bias)
    fast_loss, fast = loss_and_grads(sae, x)
    for module in (dense_ops, sparse_ops, gated):
        monkeypatch.setattr(module, "autocast_on", lambda t: True)
    sae2, _ = build(method, sparse_bias)
    plain_loss, plain = loss_and_grads(sae2, x)
    assert plain_loss == pytest.approx(fast_loss, rel=1e-5)
    assert set(plain) == set(fast)
    for name in fast:
        torch.testing.assert_close(plain[name], fast[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", LOCAL)
def test_bf16_autocast_stays_close_to_float32(method):
    sae, x = build(method)
    want_loss, want = loss_and_grads(sae, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_loss, got = loss_and_grads(sae, x)
    assert got_loss == pytest.approx(want_loss, rel=3e-2)
    assert set(got) == set(want)
    for name, g in got.items():
        assert g.dtype == torch.float32, name
        cos = torch.nn.functional.cosine_similarity(g.flatten(), want[name].flatten(), dim=0)
        assert cos > 0.98, (name, float(cos))


def test_autocast_context_casts_matmuls_only_when_asked():
    a = torch.randn(4, 4)
    with autocast("cpu", None):
        assert (a @ a).dtype == torch.float32
    with autocast("cpu", "bfloat16"):
        assert (a @ a).dtype == torch.bfloat16


def test_training_under_autocast_keeps_float32_weights_and_moves_them(tmp_path):
    store = make_store(tmp_path)
    torch.manual_seed(0)
    cls = registry.get_baseline("l1")
    sae = cls(cls.config_class(d_in=4, d_sae=8, l1_coefficient=1.0))
    before = sae.W_enc.detach().clone()
    budget = BudgetSpec(train_tokens=40, batch_size=8, d_sae=8, lr=1e-2, autocast="bfloat16")
    rec = train(Member(sae, "a", 1e-2), store, budget, seed=5)
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    assert not torch.equal(sae.W_enc, before)
    assert rec.steps == 5


@pytest.mark.parametrize("value", ["float16", "bf16", "fp8"])
def test_unknown_autocast_dtype_is_refused(value):
    from dictbench.spec import RunSpec, validate

    spec = RunSpec()
    spec.budget.autocast = value
    with pytest.raises(SpecError, match="budget.autocast"):
        validate(spec)


def test_the_weighted_penalty_stays_float32_under_autocast():
    """l1_april's penalty sum_i w_i sum_b f_bi: a bf16 dot product would round it (3
    significant digits); the sparsity term must keep float32's precision."""
    g = torch.Generator().manual_seed(0)
    x, W_enc = torch.randn(64, 16, generator=g), torch.randn(16, 300, generator=g)
    b_enc, W_dec = torch.zeros(300), torch.randn(300, 16, generator=g)
    w = torch.rand(300, generator=g) + 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f = torch.relu(x @ W_enc.to(torch.bfloat16).float())
        _, penalty = dense_ops.relu_sae_dense(f, x, None, W_enc, b_enc, W_dec, torch.zeros(16), w)
    # The same f as inside (bf16 encoder), summed in float64 outside autocast.
    f_ref = torch.relu((x.bfloat16() @ W_enc.bfloat16()).double())
    want = float((f_ref.sum(0) * w.double()).sum())
    assert penalty.dtype == torch.float32
    assert abs(float(penalty) - want) < 1e-5 * abs(want)


def test_bf16_autocast_is_refused_on_a_gpu_without_bf16(monkeypatch):
    from dictbench.errors import UserError
    from dictbench.train import trainer

    trainer._cuda_has_bf16.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(UserError, match="Tesla V100 has none"):
        autocast("cuda", "bfloat16")
    trainer._cuda_has_bf16.cache_clear()
