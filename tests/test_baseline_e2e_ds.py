"""End-to-end SAE with downstream reconstruction (baselines/e2e_ds.py), checked against
an independent computation: a plain Hugging Face forward with the SAE spliced in by a
forward hook on the hook layer, and the later layers' outputs captured by forward hooks
(never dictbench's ``run_from`` / ``logits_and_residuals``).
"""

from __future__ import annotations

import pytest
import torch

from dictbench.baselines.e2e_ds import E2EDSSAE, E2EDSConfig
from dictbench.data.corpus import keep_positions
from dictbench.data.subject import ModelSpec, SubjectModel
from dictbench.train.trainer import DownstreamHandle, SequenceBatch

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SCALE = 2.0
B, T, D_IN, D_SAE = 2, 9, 32, 48


@pytest.fixture(scope="module")
def sharp_llama(torch_one_thread) -> SubjectModel:
    """A tiny llama with larger weights than the shared fixture, whose logits are nearly
    uniform: here the KL and the later-layer differences are far from zero."""
    cfg = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
    )
    return SubjectModel.load(ModelSpec(name="tiny:llama", device="cpu", config=cfg))


def make_sae(**kw) -> E2EDSSAE:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sae = E2EDSSAE(E2EDSConfig(d_in=D_IN, d_sae=D_SAE, **kw))
        with torch.no_grad():
            sae.b_enc.normal_(0.0, 0.3)
            sae.b_dec.normal_(0.0, 0.3)
    return sae


def make_batch(subject, hook: str) -> SequenceBatch:
    g = torch.Generator().manual_seed(7)
    ids = torch.cat([torch.full((B, 1), 256), torch.randint(0, 256, (B, T - 1), generator=g)], 1)
    with torch.no_grad():
        acts = subject.run_to(hook, ids) * SCALE
    return SequenceBatch(acts, ids, torch.from_numpy(keep_positions(T)))


def reference(subject, ids, layer: int, sae=None):
    """(logits, [output of layers layer+1 .. last]) from a plain HF forward; with ``sae``,
    layer ``layer``'s output at positions 1.. is replaced by sae(s x) / s."""
    resid: list[torch.Tensor] = []

    def splice(_m, _i, out):
        x = out[0] if isinstance(out, tuple) else out
        y = x.clone()
        y[:, 1:] = sae(x[:, 1:] * SCALE) / SCALE
        return (y, *out[1:]) if isinstance(out, tuple) else y

    def grab(_m, _i, out):
        resid.append((out[0] if isinstance(out, tuple) else out).clone())

    layers = subject.layers
    handles = [layers[i].register_forward_hook(grab) for i in range(layer + 1, len(layers))]
    if sae is not None:
        handles.append(layers[layer].register_forward_hook(splice))
    try:
        with torch.no_grad():
            logits = subject.logits(ids)
    finally:
        for h in handles:
            h.remove()
    return logits, resid


def test_defaults_are_the_papers_gpt2_values():
    cfg = E2EDSConfig(d_in=D_IN, d_sae=D_SAE)
    assert cfg.kl_coefficient == 0.5
    assert cfg.downstream_coefficient == 2.5
    assert cfg.sparsity_coefficient == 1.5


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_loss_matches_independent_computation(sharp_llama, layer):
    subject = sharp_llama
    hook = f"resid_post.{layer}"
    sae = make_sae()
    sae.on_train_start(100, torch.zeros(1, D_IN))
    sae.downstream = DownstreamHandle(subject, hook, SCALE)
    batch = make_batch(subject, hook)
    step = 50  # after the sparsity warm-up

    with torch.no_grad():
        out = sae.loss(batch, step)

    clean_logits, clean_resid = reference(subject, batch.token_ids, layer)
    sae_logits, sae_resid = reference(subject, batch.token_ids, layer, sae)
    assert len(clean_resid) == len(sae_resid) == subject.n_layers - layer - 1
    mses = [
        float((((a[:, 1:] - b[:, 1:]).double() * SCALE) ** 2).mean())
        for a, b in zip(sae_resid, clean_resid, strict=True)
    ]
    ds = sum(mses) / len(mses) if mses else 0.0
    assert all(m > 1e-3 for m in mses)
    if len(mses) > 1:
        assert max(mses) > 1.5 * min(mses)  # the mean differs from the sum, first and last
    lp = torch.log_softmax(clean_logits[:, 1:].double(), -1)
    lq = torch.log_softmax(sae_logits[:, 1:].double(), -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    f = torch.relu(
        batch.acts[:, 1:].double() @ sae.W_enc.detach().double() + sae.b_enc.detach().double()
    )
    l1 = float(f.sum(-1).mean() / D_IN)

    assert float(out.terms["downstream_mse"]) == pytest.approx(ds, rel=1e-4, abs=1e-7)
    assert float(out.terms["kl"]) == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert float(out.terms["l1"]) == pytest.approx(l1, rel=1e-5)
    assert float(out.total) == pytest.approx(0.5 * kl + 1.5 * l1 + 2.5 * ds, rel=1e-4)


def test_downstream_term_alone_gives_the_sae_gradients(sharp_llama):
    hook = "resid_post.0"
    sae = make_sae(kl_coefficient=0.0, sparsity_coefficient=0.0, downstream_coefficient=1.0)
    sae.downstream = DownstreamHandle(sharp_llama, hook, SCALE)
    batch = make_batch(sharp_llama, hook)
    out = sae.loss(batch, 50)
    out.total.backward()
    assert float(out.total.detach()) == pytest.approx(float(out.terms["downstream_mse"]), rel=1e-6)
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0
    assert all(p.grad is None for p in sharp_llama.model.parameters())
