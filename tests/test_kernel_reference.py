"""Every fast kernel against the plain formula beside it: values and every gradient.

The dense and sparse kernels (baselines/dense_ops.py, baselines/sparse_ops.py) and the
two method families that switch between them (the L1 family through
``sparse_ops.relu_sae_terms``, Gated through ``GatedSAE.training_terms``) each have a
plain formula next to them, run by plain autograd. Here every kernel meets its formula
on small random inputs: every output must agree, and so must the value of a loss
that reaches every output (a random linear functional of each) and its gradient with
respect to every parameter. The switching families run on both sides of
``dense_ops.SPARSE_MAX_DENSITY`` with inputs whose density really lies on that side
(checked), so the switch itself picks the path under test.

The methods' whole steps (coefficients, warm-up, which latents are reported) against
formulas written out in the tests are tests/test_fast_paths.py's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from dictbench.baselines import dense_ops, sparse_ops
from dictbench.baselines.gated import GatedConfig, GatedSAE
from dictbench.baselines.sparse_ops import Pairs
from tests.test_fast_paths import D_IN, D_SAE, B, data

pytestmark = pytest.mark.usefixtures("torch_one_thread")

# Fraction of (token, latent) pairs that fire on each side of the switch (the switch
# is at dense_ops.SPARSE_MAX_DENSITY, 5%).
SIDES = {"dense": 0.5, "sparse": 0.03}


@dataclass
class Case:
    """One family's inputs: kernel(*args) must equal reference(*args)."""

    args: tuple[Any, ...]
    params: list[torch.Tensor]  # every tensor whose gradient is compared
    density: float | None = None  # what the switch sees, for the switching families


def leaf(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).requires_grad_(True)


def bias_for_density(pre: torch.Tensor, target: float, g: torch.Generator) -> torch.Tensor:
    """A bias that makes about ``target`` of ``pre + bias`` positive (plus small noise)."""
    cut = torch.quantile(pre.detach().flatten(), 1 - target)
    return (torch.randn(pre.shape[1], generator=g) * 0.05 - cut).requires_grad_(True)


def density(z: torch.Tensor) -> float:
    return int(torch.count_nonzero(z)) / z.numel()


# --- inputs of each family -------------------------------------------------------------


def centred_encoder_case(g: torch.Generator, side: str) -> Case:
    x = torch.randn(B, D_IN, generator=g)
    b_dec, W_enc, b_enc = leaf(g, D_IN), leaf(g, D_IN, D_SAE), leaf(g, D_SAE)
    if side == "no b_dec":  # the input is used as it is (l1_april)
        return Case((x, None, W_enc, b_enc), [W_enc, b_enc])
    return Case((x, b_dec, W_enc, b_enc), [b_dec, W_enc, b_enc])


def relu_sae_dense_case(g: torch.Generator, side: str) -> Case:
    """The fused dense kernel needs f computed first, under no_grad, as the step does."""
    x = data(4)
    W_enc, b_enc = leaf(g, D_IN, D_SAE, scale=0.3), leaf(g, D_SAE)
    W_dec, b_dec = leaf(g, D_SAE, D_IN), leaf(g, D_IN)
    w = (torch.rand(D_SAE, generator=g) + 0.5).requires_grad_(True)
    with torch.no_grad():
        f = torch.relu((x - b_dec) @ W_enc + b_enc)
    assert 0 < density(f) < 1  # both sides of the ReLU's mask exercised
    if side == "weighted":  # l1_april's penalty, no centring
        with torch.no_grad():
            f = torch.relu(x @ W_enc + b_enc)
        return Case((f, x, None, W_enc, b_enc, W_dec, b_dec, w), [W_enc, b_enc, W_dec, b_dec, w])
    return Case((f, x, b_dec, W_enc, b_enc, W_dec, b_dec), [W_enc, b_enc, W_dec, b_dec])


def relu_sae_terms_case(g: torch.Generator, side: str) -> Case:
    """``side`` is "<dense|sparse> <l1|april>": the density, and centring/weighting."""
    where, method = side.split()
    x = data(5)
    sae = SimpleNamespace(W_enc=leaf(g, D_IN, D_SAE, scale=0.3), b_dec=leaf(g, D_IN))
    sae.W_dec = torch.randn(D_SAE, D_IN, generator=g) * (torch.rand(D_SAE, 1) + 0.5)
    sae.W_dec.requires_grad_(True)  # rows of different norms, for the weighted penalty
    centred = method == "l1"
    with torch.no_grad():
        pre = (x - sae.b_dec if centred else x) @ sae.W_enc
    sae.b_enc = bias_for_density(pre, SIDES[where], g)
    with torch.no_grad():
        f0 = torch.relu(pre + sae.b_enc)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    return Case((x, sae, centred, method == "april"), params, density(f0))


def gated_dense_case(g: torch.Generator, side: str) -> Case:
    x = data(6)
    b_dec, W_enc = leaf(g, D_IN, scale=0.5), leaf(g, D_IN, D_SAE, scale=0.3)
    b_gate, r_mag, b_mag = (leaf(g, D_SAE, scale=0.5) for _ in range(3))
    W_dec = leaf(g, D_SAE, D_IN)
    norms = W_dec.norm(dim=-1)  # in the graph, as the method passes them
    with torch.no_grad():
        shared = (x - b_dec) @ W_enc
    args = (shared, x, b_dec, W_enc, b_gate, r_mag, b_mag, W_dec, norms)
    return Case(args, [b_dec, W_enc, b_gate, r_mag, b_mag, W_dec])


def gated_terms_case(g: torch.Generator, side: str) -> Case:
    torch.manual_seed(0)
    sae = GatedSAE(GatedConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=0.7))
    x = data(7)
    with torch.no_grad():
        for p in (sae.r_mag, sae.b_mag, sae.b_dec):
            p.normal_(0, 0.5, generator=g)
        shared = (x - sae.b_dec) @ sae.W_enc
        sae.b_gate.copy_(bias_for_density(shared, SIDES[side], g))
        gate = torch.relu(shared + sae.b_gate)
    return Case((sae, x), list(sae.parameters()), density(gate))


def pairs_case(g: torch.Generator, side: str) -> Case:
    """Pairs of a sparse z with a token that has no firing latent."""
    z = torch.relu(torch.randn(6, D_SAE, generator=g) - 1.0)
    z[2] = 0.0
    pairs, vals = Pairs.of_nonzeros(z)
    x = torch.randn(6, D_IN, generator=g)
    W_enc, b_dec, b_enc = leaf(g, D_IN, D_SAE), leaf(g, D_IN), leaf(g, D_SAE)
    W_dec = leaf(g, D_SAE, D_IN)
    if side == "decode":
        v = vals.clone().requires_grad_(True)
        return Case((pairs, v, W_dec), [v, W_dec])
    with torch.no_grad():  # the kernel is handed the values the selection looked at
        vals = ((x - b_dec) @ W_enc + b_enc)[pairs.rows(), pairs.cols]
    return Case((pairs, vals, x, b_dec, W_enc, b_enc), [b_dec, W_enc, b_enc])


def selected_case(g: torch.Generator, side: str) -> Case:
    """The TopK family's flat pairs: k per token, grouped by token."""
    x = data(8)
    b_dec, W_enc, b_enc = leaf(g, D_IN), leaf(g, D_IN, D_SAE, scale=0.3), leaf(g, D_SAE)
    W_dec = leaf(g, D_SAE, D_IN)
    with torch.no_grad():
        pre = (x - b_dec) @ W_enc + b_enc
    k = 4
    cols = pre.topk(k, dim=-1).indices.reshape(-1)
    rows = torch.arange(B).repeat_interleave(k)
    if side == "decode":
        vals = torch.rand(B * k, generator=g).requires_grad_(True)
        return Case((rows, cols, vals, W_dec, B), [vals, W_dec])
    return Case((pre, x, b_dec, W_enc, b_enc, rows, cols), [b_dec, W_enc, b_enc])


# --- the families: (inputs, kernel, reference, the sides it runs on) ---------------------

FAMILIES: dict[str, tuple[Callable[..., Case], Callable, Callable, tuple[str, ...]]] = {
    "centred_encoder": (
        centred_encoder_case,
        dense_ops.centred_encoder,
        dense_ops.centred_encoder_reference,
        ("both biases", "no b_dec"),
    ),
    "relu_sae_dense": (
        relu_sae_dense_case,
        dense_ops.relu_sae_dense,
        lambda f, *rest: dense_ops.relu_sae_dense_reference(*rest),
        ("plain", "weighted"),
    ),
    "relu_sae_terms": (
        relu_sae_terms_case,
        sparse_ops.relu_sae_terms,
        sparse_ops.relu_sae_reference,
        ("dense l1", "sparse l1", "dense april", "sparse april"),
    ),
    "gated_dense": (
        gated_dense_case,
        dense_ops.gated_dense,
        dense_ops.gated_dense_reference,
        ("-",),
    ),
    "gated_training_terms": (
        gated_terms_case,
        lambda sae, x: sae.training_terms(x),
        lambda sae, x: sae.loss_terms(x, one_matmul=False),
        ("dense", "sparse"),
    ),
    "pairs_encoder": (
        pairs_case,
        sparse_ops.pairs_encoder,
        sparse_ops.pairs_encoder_reference,
        ("-",),
    ),
    "pairs_decode": (
        pairs_case,
        sparse_ops.pairs_decode,
        sparse_ops.pairs_decode_reference,
        ("decode",),
    ),
    "selected_preacts": (
        selected_case,
        sparse_ops.selected_preacts,
        sparse_ops.selected_preacts_reference,
        ("-",),
    ),
    "sparse_decode": (
        selected_case,
        sparse_ops.sparse_decode,
        sparse_ops.sparse_decode_reference,
        ("decode",),
    ),
}
SWITCHING = {"relu_sae_terms", "gated_training_terms"}


def tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor of an output (a tensor, a tuple of them, or (terms dict, f))."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return [t for item in out for t in tensors(item)]


def loss_and_grads(
    outs: list[torch.Tensor], use: list[bool], params: list[torch.Tensor]
) -> list[torch.Tensor]:
    """The value of sum_i <G_i, out_i> over the outputs ``use`` marks (fixed random
    G_i) and its gradient w.r.t. every parameter (zeros where none flows)."""
    g = torch.Generator().manual_seed(99)
    weights = [torch.randn(o.shape, generator=g) for o in outs]
    loss = sum((w * o).sum() for w, o, u in zip(weights, outs, use, strict=True) if u)
    # retain_graph: inputs built once (the gated row norms) feed both sides.
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
    zeros = [torch.zeros_like(p) if d is None else d for p, d in zip(params, grads, strict=True)]
    return [loss.detach(), *zeros]


CASES = [(name, side) for name, (*_, sides) in FAMILIES.items() for side in sides]


@pytest.mark.parametrize("family,side", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_kernel_equals_its_reference_formula(family: str, side: str):
    build, kernel, reference = FAMILIES[family][:3]
    case = build(torch.Generator().manual_seed(len(family) + len(side)), side)
    if family in SWITCHING:  # the inputs really lie on this side of the switch
        on_sparse_side = case.density <= dense_ops.SPARSE_MAX_DENSITY
        assert on_sparse_side == side.startswith("sparse"), case.density
        assert case.density > 0
    got, want = tensors(kernel(*case.args)), tensors(reference(*case.args))
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"output {i}")
    # Outputs with a graph on both sides (the latents f are data to the loss).
    use = [a.requires_grad and b.requires_grad for a, b in zip(got, want, strict=True)]
    assert any(use)
    got_lg, want_lg = loss_and_grads(got, use, case.params), loss_and_grads(want, use, case.params)
    names = ["loss"] + [f"grad {i}" for i in range(len(case.params))]
    for name, a, b in zip(names, got_lg, want_lg, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert any(bool(g.abs().sum() > 0) for g in want_lg[1:])  # gradients really flow


def test_every_reference_formula_meets_its_kernel_here():
    """A kernel added with a plain formula beside it (``*_reference``) must join
    FAMILIES, so none goes untested."""
    declared = {
        f"{mod.__name__.rsplit('.', 1)[-1]}.{name}"
        for mod in (dense_ops, sparse_ops)
        for name, fn in inspect.getmembers(mod, inspect.isfunction)
        if name.endswith("_reference") and fn.__module__ == mod.__name__
    }
    tested = {
        f"{ref.__module__.rsplit('.', 1)[-1]}.{ref.__name__}"
        for _, _, ref, _ in FAMILIES.values()
        if ref.__name__ != "<lambda>"
    } | {"dense_ops.relu_sae_dense_reference"}  # through the lambda that drops f
    assert declared == tested
