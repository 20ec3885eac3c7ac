"""The sparse training path of the TopK family against the dense formulas.

The reference here is the paper's dense computation written out in the test
(pre-activations, masked latents, z @ W_dec, AuxK with a dense z_aux), run through
plain autograd; the sparse kernels must give the same loss and the same gradient
for every parameter.
"""

from __future__ import annotations

import pytest
import torch

from dictbench.baselines.batchtopk import BatchTopKConfig, BatchTopKSAE
from dictbench.baselines.sparse_ops import selected_preacts, sparse_decode
from dictbench.baselines.topk import TopKConfig, TopKSAE

pytestmark = pytest.mark.usefixtures("torch_one_thread")

D_IN, D_SAE, B = 12, 40, 16


def dense_reference(sae, x: torch.Tensor, keep: torch.Tensor, dead: torch.Tensor, k_aux: int):
    """mse + aux_coefficient * var(x) * AuxK, densely, for a given keep mask [B, d_sae]."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    z = torch.where(keep, torch.relu(pre), torch.zeros_like(pre))
    x_hat = z @ sae.W_dec + sae.b_dec
    mse = (x_hat - x).pow(2).sum(-1).mean()
    e = (x - x_hat).detach()
    k = min(k_aux, int(dead.sum()))
    if k == 0:
        return mse
    masked = pre.detach().masked_fill(~dead, float("-inf"))
    aux_keep = torch.zeros_like(keep).scatter(-1, masked.topk(k, -1).indices, True)
    z_aux = torch.where(aux_keep, torch.relu(pre), torch.zeros_like(pre))
    num = (e - z_aux @ sae.W_dec).pow(2).sum(-1).mean()
    den = (e - e.mean(0)).pow(2).sum(-1).mean()
    data_var = (x - x.mean(0)).pow(2).sum(-1).mean()
    return mse + sae.cfg.aux_coefficient * data_var * num / den


def grads(sae, loss_fn) -> dict[str, torch.Tensor]:
    sae.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in sae.named_parameters()}}


def randomised(sae):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return sae


@pytest.mark.parametrize("n_dead", [0, 3, 25])
@pytest.mark.parametrize("cls,cfg_cls", [(TopKSAE, TopKConfig), (BatchTopKSAE, BatchTopKConfig)])
def test_sparse_loss_and_gradients_equal_the_dense_formulas(cls, cfg_cls, n_dead):
    sae = randomised(cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, k=4, k_aux=6, dead_tokens_threshold=1000)))
    x = torch.randn(B, D_IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        z = sae.sparsify(pre)
    keep = z != 0
    silent = torch.nonzero(~keep.any(0)).flatten()  # latents that do not fire on this batch
    assert len(silent) >= 3
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[silent[:n_dead]] = True
    sae.train()

    aux_terms = []

    def sparse_loss():
        # Counters at the threshold pass it when the loss observes this batch (the chosen
        # latents do not fire in it); counters at 0 stay below it.
        sae.tokens_since_fired.copy_(torch.where(dead, 1000, 0))
        out = sae.loss(x, 0)
        aux_terms.append(float(out.terms["auxk"]))
        return out.total

    got = grads(sae, sparse_loss)
    assert torch.equal(sae.dead_mask(), dead)
    want = grads(sae, lambda: dense_reference(sae, x, keep, dead, 6))
    assert (aux_terms[0] > 0) == bool(dead.any())
    for name, w in want.items():
        assert torch.allclose(got[name], w, rtol=1e-4, atol=1e-5), name


def test_selected_preacts_gradient_matches_a_dense_gather():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g)
    W = torch.randn(7, 9, generator=g, requires_grad=True)
    b = torch.randn(9, generator=g, requires_grad=True)
    c = torch.randn(7, generator=g, requires_grad=True)
    rows = torch.tensor([0, 0, 1, 3, 3, 3, 4])
    cols = torch.tensor([2, 8, 0, 1, 2, 8, 8])
    w_out = torch.randn(7, generator=g)

    dense = ((x - c) @ W + b)[rows, cols]
    (dense * w_out).sum().backward()
    want = [t.grad.clone() for t in (W, b, c)]
    for t in (W, b, c):
        t.grad = None
    with torch.no_grad():
        pre = (x - c) @ W + b
    got_vals = selected_preacts(pre, x, c, W, b, rows, cols)
    assert torch.allclose(got_vals, dense.detach())
    (got_vals * w_out).sum().backward()
    for t, w in zip((W, b, c), want, strict=True):
        assert torch.allclose(t.grad, w, atol=1e-5)


def test_sparse_decode_equals_dense_product_with_empty_rows():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(9, 4, generator=g, requires_grad=True)
    rows = torch.tensor([0, 0, 2, 2, 2])  # row 1 and row 3 keep nothing
    cols = torch.tensor([1, 5, 0, 5, 8])
    vals = torch.randn(5, generator=g, requires_grad=True)
    z = torch.zeros(4, 9).index_put((rows, cols), vals, accumulate=True)
    want = z @ W
    got = sparse_decode(rows, cols, vals, W, 4)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(got[1], torch.zeros(4)) and torch.equal(got[3], torch.zeros(4))
