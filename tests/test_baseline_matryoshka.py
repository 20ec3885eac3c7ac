"""The Matryoshka BatchTopK SAE (baselines/matryoshka.py) against hand computations."""

from __future__ import annotations

import copy

import pytest
import torch
from synthetic_sparse import D, M, sparse_store

from dictbench.baselines.batchtopk import BatchTopKConfig, BatchTopKSAE
from dictbench.baselines.matryoshka import (
    DEFAULT_GROUPS,
    MatryoshkaConfig,
    MatryoshkaSAE,
    group_ends,
)
from dictbench.errors import SpecError, UserError
from dictbench.io import saelens
from dictbench.registry import get_baseline
from dictbench.spec import BudgetSpec
from dictbench.train.lockstep import Member
from dictbench.train.trainer import train

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def random_sae(d_in=8, d_sae=16, k=3, groups=(2, 2, 4, 8), seed=0) -> MatryoshkaSAE:
    torch.manual_seed(seed)
    cfg = MatryoshkaConfig(d_in=d_in, d_sae=d_sae, k=k, groups=list(groups))
    sae = MatryoshkaSAE(cfg)
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(d_sae))
        sae.b_dec.copy_(0.3 * torch.randn(d_in))
    return sae


# --- configuration -------------------------------------------------------------------------


def test_registered_with_the_k_knob_and_paper_default_groups():
    assert get_baseline("matryoshka") is MatryoshkaSAE
    assert MatryoshkaSAE.sparsity_knob == "k"
    # The paper's code at d_sae = 36,864 (2304 * 16): 576, 576, 1152, 2304, 4608, 9216, 18432.
    sizes = [576, 576, 1152, 2304, 4608, 9216, 18432]
    ends = group_ends(None, 36864)
    assert [b - a for a, b in zip((0, *ends[:-1]), ends, strict=True)] == sizes
    assert sum(DEFAULT_GROUPS) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "groups, want",
    [([2, 2, 4], (2, 4, 8)), ([0.25, 0.25, 0.5], (2, 4, 8)), ([1.0], (8,)), ([8], (8,))],
)
def test_group_sizes_or_fractions(groups, want):
    assert group_ends(groups, 8) == want


def test_fractions_rounding_to_an_empty_group_drop_it():
    # Cumulative ends 16 * (1, 2, 4, 8, 16, 32, 64) / 64 = 0.25, 0.5, 1, 2, 4, 8, 16 round to
    # 0, 0, 1, 2, 4, 8, 16: the two empty groups are dropped.
    assert group_ends(None, 16) == (1, 2, 4, 8, 16)


@pytest.mark.parametrize("groups", [[2, 2], [0.5, 0.6], [-1, 9], [], "abc"])
def test_bad_groups_are_one_line_spec_errors(groups):
    with pytest.raises(SpecError) as err:
        MatryoshkaSAE(MatryoshkaConfig(d_in=4, d_sae=8, groups=groups))
    assert "matryoshka groups" in str(err.value) and "\n" not in str(err.value)


# --- the loss by hand --------------------------------------------------------------------


def hand_sae() -> MatryoshkaSAE:
    """d_in 2, d_sae 3, groups {0} and {1, 2}; decoder rows e1, e2, (0.6, 0.8); W_enc = W_dec^T."""
    sae = MatryoshkaSAE(MatryoshkaConfig(d_in=2, d_sae=3, k=2, groups=[1, 2]))
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    with torch.no_grad():
        sae.W_dec.copy_(w)
        sae.W_enc.copy_(w.t())
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_prefix_losses_by_hand():
    # x1 = (2, 0.5): pre = (2, 0.5, 1.6); x2 = (0, 3): pre = (0, 3, 2.4).
    # k*B = 4 kept over the batch: 3, 2.4, 2, 1.6 -> x1 keeps latents 0 and 2, x2 keeps 1 and 2.
    # Prefix 1 (latent 0): x1_hat = (2, 0), error 0.25; x2_hat = (0, 0), error 9. Mean 4.625.
    # Prefix 2 (all):      x1_hat = (2.96, 1.28), error 0.96^2 + 0.78^2 = 1.53;
    #                      x2_hat = (1.44, 4.92), error 1.44^2 + 1.92^2 = 5.76. Mean 3.645.
    sae = hand_sae()
    x = torch.tensor([[2.0, 0.5], [0.0, 3.0]])
    losses, _ = sae.prefix_losses(x)
    assert [float(v.detach()) for v in losses] == pytest.approx([4.625, 3.645], rel=1e-6)
    out = sae.loss(x, 0)
    assert float(out.total) == pytest.approx(4.625 + 3.645, rel=1e-6)  # nothing dead: no AuxK
    assert float(out.terms["mse"]) == pytest.approx(3.645, rel=1e-6)
    assert float(out.terms["prefix_mse_sum"]) == pytest.approx(4.625, rel=1e-6)


def test_gradients_reach_a_group_only_from_prefixes_containing_it():
    sae = random_sae(seed=1)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    losses, _ = sae.prefix_losses(x)
    starts = (0, *sae.ends[:-1])
    for j, end in enumerate(sae.ends):
        g_enc, g_dec, g_benc = torch.autograd.grad(
            losses[j], [sae.W_enc, sae.W_dec, sae.b_enc], retain_graph=True
        )
        assert torch.all(g_enc[:, end:] == 0) and torch.all(g_dec[end:] == 0)
        assert torch.all(g_benc[end:] == 0)
        assert g_dec[:end].abs().sum() > 0  # prefix j does train its own latents
        # ... and each of its groups that fired
        for a, b in zip(starts[: j + 1], sae.ends[: j + 1], strict=True):
            assert g_dec[a:b].abs().sum() > 0


def test_decoder_gradient_matches_the_dense_formula():
    # dL/dW_dec[i] = sum over prefixes m containing i of (2/B) sum_b z_bi (x_hat_m,b - x_b).
    sae = random_sae(seed=3)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(4))
    sae.loss(x, 0).total.backward()
    with torch.no_grad():
        z = sae.encode(x)  # training mode: the same BatchTopK selection, dense
        want = torch.zeros_like(sae.W_dec)
        for end in sae.ends:
            x_hat = z[:, :end] @ sae.W_dec[:end] + sae.b_dec
            want[:end] += (2 / x.shape[0]) * z[:, :end].t() @ (x_hat - x)
    assert torch.allclose(sae.W_dec.grad, want, atol=1e-5)


def test_kept_count_is_k_times_b():
    sae = random_sae(k=3, seed=5)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: exactly k*B kept
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(6))
    _, sel = sae.prefix_losses(x)
    assert sel["cols"].numel() == 3 * 50
    assert int((sel["vals"] > 0).sum()) == 3 * 50
    with torch.no_grad():
        assert int((sae.encode(x) != 0).sum()) == 3 * 50


# --- one group is BatchTopK -----------------------------------------------------------------


@pytest.mark.parametrize("groups", [[1.0], [M]])
def test_one_group_equals_batchtopk_after_trainer_steps(tmp_path, groups):
    budget = BudgetSpec(train_tokens=12 * 256, batch_size=256, d_sae=M, lr=1e-2)
    store = sparse_store(tmp_path, budget.train_tokens)
    # k = 1 and a zero dead threshold, so that some latents miss a batch and AuxK is part
    # of the comparison.
    common = {"d_in": D, "d_sae": M, "k": 1, "dead_tokens_threshold": 0, "k_aux": 8}
    trained = {}
    for name, cls, cfg in (
        ("batchtopk", BatchTopKSAE, BatchTopKConfig(**common)),
        ("matryoshka", MatryoshkaSAE, MatryoshkaConfig(**common, groups=groups)),
    ):
        torch.manual_seed(0)
        sae = cls(cfg)
        rec = train(Member(sae, name, budget.lr), store, budget, seed=0)
        assert rec.steps == 12
        trained[name] = sae
    a, b = trained["batchtopk"].state_dict(), trained["matryoshka"].state_dict()
    assert a.keys() == b.keys()
    assert bool(trained["batchtopk"].dead_mask().any())  # AuxK was exercised
    for key in a:
        assert torch.equal(a[key], b[key]), key
    x = torch.randn(256, D, generator=torch.Generator().manual_seed(9))
    for m in trained.values():
        m.train()
    la, lb = trained["batchtopk"].loss(x, 0), trained["matryoshka"].loss(x, 0)
    assert torch.equal(la.total, lb.total)


# --- constraints and folding ---------------------------------------------------------------


def test_decoder_rows_unit_norm_after_adam_steps():
    sae = random_sae(seed=7)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(8))
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    for step in range(3):
        opt.zero_grad()
        sae.loss(x, step).total.backward()
        sae.before_optimizer_step()
        opt.step()
        sae.after_step()
        assert (sae.W_dec.detach().norm(dim=-1) - 1).abs().max() < 1e-6


@pytest.mark.parametrize("scale", [3.7, 0.25])
def test_fold_input_scale_is_exact(scale):
    trained = random_sae(seed=9)  # stands for an SAE trained on scale * x
    trained.threshold.fill_(0.4)
    folded = copy.deepcopy(trained)
    folded.fold_input_scale(scale)
    assert float(folded.threshold) == pytest.approx(0.4 / scale, rel=1e-6)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(10))
    for mode in ("train", "eval"):
        for m in (trained, folded):
            m.train(mode == "train")
        with torch.no_grad():
            f_scaled = trained.encode(scale * x)
            assert (f_scaled > 0).any() and (f_scaled == 0).any()
            assert torch.allclose(folded.encode(x), f_scaled / scale, atol=1e-5)
            assert torch.allclose(folded(x), trained(scale * x) / scale, atol=1e-5)
    # Each prefix's squared error scales by scale^2.
    trained.train()
    folded.train()
    with torch.no_grad():
        big, _ = trained.prefix_losses(scale * x)
        small, _ = folded.prefix_losses(x)
    for u, v in zip(big, small, strict=True):
        assert float(u) == pytest.approx(scale**2 * float(v), rel=1e-5)


# --- SAELens export ------------------------------------------------------------------------


def exported_module(sae: MatryoshkaSAE) -> saelens.SAELensSAE:
    arch, tensors, extra = sae.saelens_export()
    assert arch == "jumprelu" and arch in saelens.ARCHITECTURES and extra == {}
    d_sae, d_in = sae.W_dec.shape
    module = saelens.SAELensSAE(arch, d_in, d_sae)
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(module, name).copy_(value)
    return module.eval()


def trained_looking_sae() -> MatryoshkaSAE:
    sae = random_sae(seed=11)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
        sae.threshold.fill_(0.4)
    return sae.eval()


def test_export_computes_the_same_function():
    sae = trained_looking_sae()
    module = exported_module(sae)
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        f = sae.encode(x)
        assert (f > 0).any() and (f == 0).any()
        assert torch.equal(module.encode(x), f)
        assert torch.allclose(module.decode(f), sae.decode(f), atol=1e-6)


def test_real_saelens_loads_the_export(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    if int(sae_lens.__version__.split(".")[0]) < 6:
        pytest.skip("loads with the SAELens 6 API")
    sae = trained_looking_sae()
    module = exported_module(sae)
    cfg = saelens.saelens_config(module, "resid_post.2", "tiny:llama", None, None)
    out = saelens.write_folder(tmp_path / "sl", module.state_for_saelens(), cfg)
    theirs = sae_lens.SAE.load_from_disk(str(out))
    x = torch.randn(128, 8, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        f = sae.encode(x)
        assert torch.allclose(theirs.encode(x), f, atol=1e-6)
        assert torch.allclose(theirs.decode(f), sae.decode(f), atol=1e-5)


def test_export_command_path(tmp_path):
    """Through ``dictbench export`` (bench/io/saelens.py), where that path knows the class."""
    from dictbench.io.sae_io import save_sae

    sae = trained_looking_sae()
    save_sae(sae, tmp_path / "m", {"sae_id": "m", "hook": "resid_post.2", "model": "tiny:llama"})
    try:
        out = saelens.export(tmp_path / "m", tmp_path / "m-sl")
    except UserError as err:
        pytest.skip(f"bench/io/saelens.py does not export matryoshka yet: {err}")
    loaded, info = saelens.load_saelens(out)
    assert info.architecture == "jumprelu"
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), sae.encode(x))
