"""The L1 and Gated training steps against their plain autograd formulas.

Each step computes the encoder matmul once and then takes a dense path (fused
encoder backward) or, when few latents fire, a sparse path through the firing pairs
(baselines/dense_ops.py, baselines/sparse_ops.py). Both must give the loss and every
parameter's gradient of the formula written out here, at densities on both sides of
the switch; the gated auxiliary term must still leave W_dec and b_dec alone. Each
kernel against the plain formula beside it is tests/test_kernel_reference.py's.
"""

from __future__ import annotations

import pytest
import torch

from dictbench import registry
from dictbench.baselines import dense_ops
from dictbench.baselines.dense_ops import relu_path_is_sparse
from dictbench.baselines.gated import GatedConfig, GatedSAE
from dictbench.baselines.l1 import L1SAE, L1Config
from dictbench.baselines.l1_april import L1AprilConfig, L1AprilSAE

pytestmark = pytest.mark.usefixtures("torch_one_thread")

D_IN, D_SAE, B = 10, 48, 24


def param_grads(module: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.fixture(params=["dense", "sparse"])
def path(request, monkeypatch):
    """Force one path whatever the density: the switch is a cost decision only."""
    monkeypatch.setattr(dense_ops, "SPARSE_MAX_DENSITY", 1.0 if request.param == "sparse" else -1)
    return request.param


def data(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, D_IN, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.3


@pytest.mark.parametrize("weighted", [False, True])
def test_relu_sae_dense_gives_every_gradient_by_hand(weighted):
    """x_hat = f W_dec + b_dec and P = sum f_bi w_i, with f = ReLU((x - b_dec) W_enc + b_enc)
    and the centring b_dec the decoder's own (as in ``l1``); gradients written out."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, D_IN, generator=g)

    def leaf(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(True)

    W_enc, b_enc, W_dec, b_dec = leaf(D_IN, D_SAE), leaf(D_SAE), leaf(D_SAE, D_IN), leaf(D_IN)
    w = leaf(D_SAE) if weighted else None
    with torch.no_grad():
        f = torch.relu((x - b_dec) @ W_enc + b_enc)
    assert 0 < int(torch.count_nonzero(f)) < f.numel()  # both sides of the mask exercised
    x_hat, pen = dense_ops.relu_sae_dense(f, x, b_dec, W_enc, b_enc, W_dec, b_dec, w)
    ones = torch.ones(D_SAE)
    torch.testing.assert_close(x_hat, f @ W_dec + b_dec)
    torch.testing.assert_close(pen, (f @ (w if weighted else ones)).sum())
    G, c = torch.randn(B, D_IN, generator=g), 0.37  # dL/dx_hat and dL/dP
    params = [W_enc, b_enc, W_dec, b_dec] + ([w] if weighted else [])
    got = torch.autograd.grad((x_hat * G).sum() + c * pen, params)
    wv = (w if weighted else ones).detach()
    g_pre = (G @ W_dec.detach().t() + c * wv) * (f > 0)
    xc = x - b_dec.detach()
    want = [
        xc.t() @ g_pre,
        g_pre.sum(0),
        f.t() @ G,
        G.sum(0) - W_enc.detach() @ g_pre.sum(0),
    ] + ([c * f.sum(0)] if weighted else [])
    for name, a, b in zip("W_enc b_enc W_dec b_dec w".split(), got, want, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_the_density_of_a_large_matrix_is_judged_on_a_row_sample(monkeypatch):
    """Above DENSITY_SAMPLE entries only every stride-th row is counted: rows the
    sample skips cannot change the decision, rows it takes can."""
    monkeypatch.setattr(dense_ops, "DENSITY_SAMPLE", 64)
    monkeypatch.setattr(dense_ops, "SPARSE_MAX_DENSITY", 0.05)
    z = torch.zeros(64, 8)  # 512 entries: stride 8, rows 0, 8, ..., 56
    z[1:8] = 1.0  # skipped rows, all firing
    assert relu_path_is_sparse(z)
    z[0] = 1.0  # a sampled row fully firing: 8 of 64 sampled entries
    assert not relu_path_is_sparse(z)


@pytest.mark.parametrize("b_enc_shift", [0.0, -2.5])  # about half / a few latents fire
def test_l1_step_equals_the_formula(path, b_enc_shift):
    torch.manual_seed(0)
    sae = L1SAE(L1Config(d_in=D_IN, d_sae=D_SAE, l1_coefficient=0.7, l1_warmup_frac=0.0))
    with torch.no_grad():
        sae.b_enc.normal_().add_(b_enc_shift)
        sae.b_dec.normal_()
    x = data()
    out = sae.loss(x, 5)
    got = param_grads(sae, out.total)
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    want_loss = ((f @ sae.W_dec + sae.b_dec - x) ** 2).sum(-1).mean() + 0.7 * f.abs().sum(-1).mean()
    torch.testing.assert_close(out.total, want_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.latents > 0, f.detach() > 0)
    assert_same_grads(got, param_grads(sae, want_loss))


def gated_formula(sae: GatedSAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    xc = x - sae.b_dec
    pi_gate = xc @ sae.W_enc + sae.b_gate
    pi_mag = xc @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag
    f = (pi_gate > 0).float() * torch.relu(pi_mag)
    gate = torch.relu(pi_gate)
    return {
        "mse": ((f @ sae.W_dec + sae.b_dec - x) ** 2).sum(-1).mean(),
        "l1": (gate * sae.W_dec.norm(dim=-1)).sum(-1).mean(),
        "aux": ((gate @ sae.W_dec.detach() + sae.b_dec.detach() - x) ** 2).sum(-1).mean(),
    }


@pytest.mark.parametrize("b_gate_shift", [0.0, -2.5])
def test_gated_step_equals_the_formula(path, b_gate_shift):
    torch.manual_seed(0)
    sae = GatedSAE(GatedConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=0.7, l1_warmup_frac=0.0))
    with torch.no_grad():
        for p in (sae.b_gate, sae.r_mag, sae.b_mag, sae.b_dec):
            p.normal_(0, 0.5)
        sae.b_gate.add_(b_gate_shift)
    x = data(1)
    out = sae.loss(x, 5)
    got = param_grads(sae, out.total)
    want = gated_formula(sae, x)
    for name in ("mse", "l1", "aux"):
        torch.testing.assert_close(out.terms[name], want[name].detach(), rtol=1e-5, atol=1e-5)
    assert_same_grads(got, param_grads(sae, want["mse"] + 0.7 * want["l1"] + want["aux"]))


def test_gated_sparse_aux_term_leaves_the_decoder_alone(monkeypatch):
    monkeypatch.setattr(dense_ops, "SPARSE_MAX_DENSITY", 1.0)
    torch.manual_seed(0)
    sae = GatedSAE(GatedConfig(d_in=D_IN, d_sae=D_SAE))
    with torch.no_grad():
        sae.b_gate.fill_(-1.0)
    x = data(2)
    with torch.no_grad():
        shared = (x - sae.b_dec) @ sae.W_enc
        gate0 = torch.relu(shared + sae.b_gate)
    terms, _ = sae._sparse_terms(x, shared, gate0)
    grads = torch.autograd.grad(terms["aux"], [sae.W_dec, sae.b_dec, sae.W_enc], allow_unused=True)
    assert grads[0] is None or torch.count_nonzero(grads[0]) == 0
    # b_dec still gets the encoder-centring gradient, exactly as in the formula.
    want = torch.autograd.grad(gated_formula(sae, x)["aux"], [sae.b_dec, sae.W_enc])
    torch.testing.assert_close(grads[1], want[0], rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(grads[2]) > 0


def test_the_switch_follows_the_density(monkeypatch):
    monkeypatch.setattr(dense_ops, "SPARSE_MAX_DENSITY", 0.25)
    z = torch.zeros(4, 8)
    z[0, :8] = 1.0  # 8 of 32 = 0.25
    assert relu_path_is_sparse(z)
    z[1, 0] = 1.0
    assert not relu_path_is_sparse(z)


@pytest.mark.parametrize("b_enc_shift", [0.0, -2.5])
def test_l1_april_step_equals_the_formula(path, b_enc_shift):
    torch.manual_seed(0)
    sae = L1AprilSAE(L1AprilConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=0.7, l1_warmup_frac=0.0))
    with torch.no_grad():
        sae.b_enc.normal_().add_(b_enc_shift)
        sae.b_dec.normal_()
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)  # rows of different norms
    x = data(3)
    out = sae.loss(x, 5)
    got = param_grads(sae, out.total)
    f = torch.relu(x @ sae.W_enc + sae.b_enc)
    penalty = (f * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    want_loss = ((f @ sae.W_dec + sae.b_dec - x) ** 2).sum(-1).mean() + 0.7 * penalty
    torch.testing.assert_close(out.total, want_loss, rtol=1e-5, atol=1e-5)
    assert_same_grads(got, param_grads(sae, want_loss))


def test_batchtopk_cut_keeps_the_largest_with_ties_in_index_order():
    from dictbench.baselines.batchtopk import top_flat_indices

    flat = torch.tensor([0.0, 3.0, 1.0, 2.0, 2.0, 0.5, 2.0, 0.0])
    assert top_flat_indices(flat, 1).tolist() == [1]
    # 3.0 then two of the three 2.0s: the first two in index order
    assert top_flat_indices(flat, 3).tolist() == [1, 3, 4]
    assert top_flat_indices(flat, 6).tolist() == [1, 2, 3, 4, 5, 6]
    # more places than positive values: the zeros are left out
    assert top_flat_indices(flat, 8).tolist() == [1, 2, 3, 4, 5, 6]
    assert top_flat_indices(flat, 0).tolist() == []
    big = torch.rand(5000, generator=torch.Generator().manual_seed(0))
    want = torch.sort(big.topk(321).indices).values
    assert torch.equal(top_flat_indices(big, 321), want)


@pytest.mark.parametrize("method", ["l1", "l1_april", "gated", "topk", "batchtopk", "jumprelu"])
def test_encoding_passes_gradients_to_the_input(method):
    """Training may treat its batch as data, but ``sae(x)`` is also used for attribution
    and splicing, where d x_hat / d x must be the formula's, not zero."""
    cls = registry.get_baseline(method)
    torch.manual_seed(0)
    sae = cls(cls.config_class(d_in=6, d_sae=24, **({"k": 3} if "topk" in method else {})))
    sae.eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    sae.double()
    jac = torch.autograd.functional.jacobian(lambda t: sae(t).sum(0), x)  # [6, 5, 6]
    h = 1e-6
    for j in range(6):
        dx = torch.zeros_like(x)
        dx[:, j] = h
        with torch.no_grad():
            num = (sae(x + dx).sum(0) - sae(x - dx).sum(0)) / (2 * h)
        assert torch.allclose(jac[:, :, j].sum(1), num, atol=1e-5), (method, j)
    assert jac.abs().sum() > 0
