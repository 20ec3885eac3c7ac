"""End-to-end SAE (baselines/e2e.py) against independent computations.

Reference values come from the unmodified Hugging Face forward (``subject.logits``)
with the SAE spliced in by a plain forward hook on the hook layer, never from
dictbench's ``run_from``, so a wrong unit (training vs raw), a spliced special
position or a wrong KL direction all show up.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dictbench.baselines.e2e import E2ESAE, E2EConfig
from dictbench.baselines.e2e_ds import E2EDSSAE, E2EDSConfig
from dictbench.data.cache import ActivationStore
from dictbench.data.corpus import keep_positions
from dictbench.data.subject import ModelSpec, SubjectModel
from dictbench.spec import BudgetSpec
from dictbench.train.lockstep import Member
from dictbench.train.trainer import (
    DownstreamHandle,
    SequenceBatch,
    TrainingFailed,
    train,
    window_order,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

HOOK = "resid_post.0"
SCALE = 2.0
B, T = 2, 9
D_SAE = 48


@pytest.fixture(scope="module")
def sharp_llama(torch_one_thread) -> SubjectModel:
    """A tiny llama with larger weights: the shared fixture's logits are nearly uniform,
    which makes KL(p||q) and KL(q||p) agree to 1e-4 and hides a swapped direction."""
    cfg = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
    )
    return SubjectModel.load(ModelSpec(name="tiny:llama", device="cpu", config=cfg))


def make_sae(cls=E2ESAE, cfg_cls=E2EConfig, seed: int = 0, d_in: int = 32, **kw):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        sae = cls(cfg_cls(d_in=d_in, d_sae=D_SAE, **kw))
        # A "trained-looking" SAE: non-zero biases, decoder rows of uneven norm.
        with torch.no_grad():
            sae.b_enc.normal_(0.0, 0.3)
            sae.b_dec.normal_(0.0, 0.3)
            sae.W_dec.mul_(torch.rand(D_SAE, 1) * 2 + 0.5)
    return sae


def make_ids(n: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    body = torch.randint(0, 256, (n, t - 1), generator=g)
    return torch.cat([torch.full((n, 1), 256), body], dim=1)


def make_batch(subject, hook: str = HOOK, scale: float = SCALE, seed: int = 7) -> SequenceBatch:
    ids = make_ids(B, T, seed)
    with torch.no_grad():
        acts = subject.run_to(hook, ids) * scale
    return SequenceBatch(acts, ids, torch.from_numpy(keep_positions(T)))


def hook_layer(hook: str) -> int:
    return int(hook.split(".")[1])


def reference_logits(subject, ids, sae=None, scale: float = SCALE, layer: int = 0):
    """Full HF forward; with ``sae``, layer ``layer``'s output at positions 1.. replaced
    by the SAE's reconstruction in raw units (sae(s x) / s)."""

    def splice(_m, _i, out):
        x = out[0] if isinstance(out, tuple) else out
        y = x.clone()
        y[:, 1:] = sae(x[:, 1:] * scale) / scale
        return (y, *out[1:]) if isinstance(out, tuple) else y

    handle = subject.layers[layer].register_forward_hook(splice) if sae is not None else None
    try:
        with torch.no_grad():
            return subject.logits(ids)
    finally:
        if handle is not None:
            handle.remove()


def reference_kl(clean: torch.Tensor, sae_logits: torch.Tensor) -> float:
    """KL(p_clean || p_sae) averaged over positions 1..T-1 and the batch, in float64."""
    lp = torch.log_softmax(clean[:, 1:].double(), -1)
    lq = torch.log_softmax(sae_logits[:, 1:].double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def reference_l1(sae, acts: torch.Tensor) -> float:
    x = acts[:, 1:].double()
    f = torch.relu(x @ sae.W_enc.detach().double() + sae.b_enc.detach().double())
    return float(f.abs().sum(-1).mean() / x.shape[-1])


# --- the loss against an independent computation --------------------------------------


@pytest.mark.parametrize("step, warm", [(0, 1 / 5), (3, 4 / 5), (50, 1.0)])
def test_loss_terms_match_independent_computation(sharp_llama, step, warm):
    subject = sharp_llama
    sae = make_sae(kl_coefficient=0.7, sparsity_coefficient=0.3)
    sae.on_train_start(100, torch.zeros(1, 32))  # sparsity warm-up = 5 steps
    sae.downstream = DownstreamHandle(subject, HOOK, SCALE)
    batch = make_batch(subject)

    with torch.no_grad():
        out = sae.loss(batch, step)

    clean = reference_logits(subject, batch.token_ids)
    spliced = reference_logits(subject, batch.token_ids, sae)
    kl = reference_kl(clean, spliced)
    l1 = reference_l1(sae, batch.acts)
    # The SAE really changes the prediction, and the two KL directions differ by far more
    # than the tolerance: the check has teeth.
    assert kl > 0.05
    assert abs(reference_kl(spliced, clean) - kl) > 1e-2 * kl
    assert float(out.terms["kl"]) == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert float(out.terms["l1"]) == pytest.approx(l1, rel=1e-5)
    assert float(out.total) == pytest.approx(0.7 * kl + 0.3 * warm * l1, rel=1e-4, abs=1e-7)
    assert out.latents.shape == (B * (T - 1), D_SAE)


def test_decoder_rows_are_normalised_in_the_forward_pass():
    sae = make_sae()
    f = torch.rand(5, D_SAE)
    before = sae.decode(f).detach()
    w = sae.W_dec.detach().double()
    want = f.double() @ (w / w.norm(dim=-1, keepdim=True)) + sae.b_dec.detach().double()
    assert torch.allclose(before.double(), want, atol=1e-5)
    with torch.no_grad():
        sae.W_dec[3] *= 3.0
        sae.W_dec[7] *= 0.1
    assert torch.allclose(sae.decode(f).detach(), before, atol=1e-5)


def test_gradients_reach_the_sae_and_not_the_subject(tiny_llama):
    sae = make_sae(sparsity_coefficient=0.0)  # only the KL path gives gradients
    sae.downstream = DownstreamHandle(tiny_llama, HOOK, SCALE)
    out = sae.loss(make_batch(tiny_llama), 10)
    out.total.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    for name, p in tiny_llama.model.named_parameters():
        assert not p.requires_grad, name
        assert p.grad is None, name


def test_the_downstream_of_a_bfloat16_model_takes_float32_and_gives_float32(tiny_llama_bf16):
    ids = make_ids(B, T, 3)
    with torch.no_grad():
        acts = tiny_llama_bf16.run_to(HOOK, ids).float() * SCALE
        logits = DownstreamHandle(tiny_llama_bf16, HOOK, SCALE).logits(acts, ids)
        want = tiny_llama_bf16.logits(ids)
    assert want.dtype == torch.bfloat16 and logits.dtype == torch.float32
    assert torch.equal(logits, want.float())  # the bf16 round trip of the acts is exact


@pytest.mark.parametrize("cls, cfg_cls", [(E2ESAE, E2EConfig), (E2EDSSAE, E2EDSConfig)])
def test_e2e_losses_train_through_a_bfloat16_model(tiny_llama_bf16, cls, cfg_cls):
    sae = make_sae(cls, cfg_cls)
    sae.downstream = DownstreamHandle(tiny_llama_bf16, HOOK, SCALE)
    batch = make_batch(tiny_llama_bf16)
    batch = SequenceBatch(batch.acts.float(), batch.token_ids, batch.keep)  # as cached
    out = sae.loss(batch, 10)
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)
    assert float(out.terms["kl"]) > 0
    out.total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sae.parameters())


@pytest.mark.parametrize("hook", ["resid_post.0", "resid_post.1"])
@pytest.mark.parametrize("cls, cfg_cls", [(E2ESAE, E2EConfig), (E2EDSSAE, E2EDSConfig)])
def test_only_layers_after_the_hook_run_twice(tiny_llama, hook, cls, cfg_cls):
    sae = make_sae(cls, cfg_cls)
    sae.downstream = DownstreamHandle(tiny_llama, hook, SCALE)
    batch = make_batch(tiny_llama, hook)
    layers = list(tiny_llama.layers)  # the original modules
    calls = [0] * len(layers)

    def counter(i):
        def hook_fn(_m, _i, _o):
            calls[i] += 1

        return hook_fn

    handles = [layer.register_forward_hook(counter(i)) for i, layer in enumerate(layers)]
    try:
        sae.loss(batch, 0).total.backward()
    finally:
        for h in handles:
            h.remove()
    last = hook_layer(hook)
    assert calls == [0] * (last + 1) + [2] * (len(layers) - last - 1)
    # run_from put the original layers back.
    assert all(a is b for a, b in zip(tiny_llama.layers, layers, strict=True))


def test_position_zero_is_never_replaced(tiny_llama):
    sae = make_sae()
    handle = DownstreamHandle(tiny_llama, HOOK, SCALE)
    seen: list[torch.Tensor] = []
    original = handle.logits

    def spy(acts, token_ids):
        seen.append(acts.detach().clone())
        return original(acts, token_ids)

    handle.logits = spy
    sae.downstream = handle
    batch = make_batch(tiny_llama)
    sae.loss(batch, 0)
    assert len(seen) == 2  # clean, then spliced
    clean, spliced = seen
    assert torch.equal(clean, batch.acts)
    assert torch.equal(spliced[:, 0], batch.acts[:, 0])
    with torch.no_grad():
        want = sae(batch.acts[:, 1:])
    assert torch.allclose(spliced[:, 1:], want, atol=1e-6)
    assert not torch.allclose(spliced[:, 1:], batch.acts[:, 1:], atol=1e-2)


def test_fold_input_scale_is_exact():
    s = 3.7
    trained = make_sae(seed=3)
    folded = copy.deepcopy(trained)
    folded.fold_input_scale(s)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)) * 4
    with torch.no_grad():
        f_trained = trained.encode(s * x)
        assert (f_trained > 0).any() and (f_trained == 0).any()
        assert torch.allclose(folded.encode(x), f_trained / s, atol=1e-5)
        assert torch.allclose(folded(x), trained(s * x) / s, atol=1e-5)


# --- training through the shared loop -------------------------------------------------

N_WIN, CTX = 24, 9


@pytest.fixture(scope="module")
def e2e_store(tiny_llama, tmp_path_factory) -> ActivationStore:
    ids = make_ids(N_WIN, CTX, seed=21)
    with torch.no_grad():
        acts = tiny_llama.run_to(HOOK, ids).float().numpy()
    acts = np.ascontiguousarray(acts, dtype=np.float32)
    return ActivationStore(
        path=tmp_path_factory.mktemp("e2e_store"),
        acts=acts,
        tokens=ids.numpy().astype(np.int32),
        mean=acts[:, 1:].reshape(-1, acts.shape[-1]).mean(0),
        meta={},
    )


def recording(cls):
    class Recording(cls):
        def loss(self, batch, step):
            self.seen_ids.append(batch.token_ids.clone())
            self.seen_steps.append(step)
            return super().loss(batch, step)

    return Recording


def test_train_runs_counts_tokens_and_drops_the_model(tiny_llama, e2e_store):
    batch_size, seed = 20, 5
    budget = BudgetSpec(train_tokens=64, batch_size=batch_size, d_sae=D_SAE, lr=1e-3)
    seqs = batch_size // (CTX - 1)  # 2 whole windows per step
    saes = [
        recording(E2ESAE)(E2EConfig(d_in=32, d_sae=D_SAE, sparsity_coefficient=0.1)),
        recording(E2ESAE)(
            E2EConfig(d_in=32, d_sae=D_SAE, sparsity_coefficient=5.0, kl_coefficient=2.0)
        ),
    ]
    records = []
    for i, sae in enumerate(saes):
        sae.seen_ids, sae.seen_steps = [], []
        rec = train(
            Member(sae, f"e2e_{i}", 1e-3),
            e2e_store,
            budget,
            seed=seed,
            subject=tiny_llama,
            hook=HOOK,
        )
        records.append(rec)
        assert sae.downstream is None
        assert not any(isinstance(v, DownstreamHandle) for v in vars(sae).values())
        assert "kl" in rec.final_terms and "l1" in rec.final_terms

    for rec in records:
        assert rec.steps == 4
        assert rec.tokens == rec.steps * seqs * (CTX - 1) == 64
    a, b = saes
    assert a.seen_steps == b.seen_steps == [0, 1, 2, 3]
    assert len(a.seen_ids) == 4
    windows = window_order(e2e_store, seed)
    for step, (ia, ib) in enumerate(zip(a.seen_ids, b.seen_ids, strict=True)):
        assert torch.equal(ia, ib)
        idx = np.sort(windows[step * seqs : (step + 1) * seqs])
        assert torch.equal(ia, torch.from_numpy(e2e_store.tokens[idx].astype(np.int64)))


def test_training_lowers_the_kl(tiny_llama, e2e_store):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        sae = E2ESAE(E2EConfig(d_in=32, d_sae=D_SAE, sparsity_coefficient=0.01))
    start = copy.deepcopy(sae)
    budget = BudgetSpec(train_tokens=N_WIN * (CTX - 1), batch_size=CTX - 1, d_sae=D_SAE)
    rec = train(Member(sae, "e2e", 1e-2), e2e_store, budget, seed=0, subject=tiny_llama, hook=HOOK)
    assert rec.steps == N_WIN
    assert sae.downstream is None

    idx = np.arange(4)
    batch = SequenceBatch(
        torch.from_numpy(e2e_store.acts[idx]) * rec.input_scale,
        torch.from_numpy(e2e_store.tokens[idx].astype(np.int64)),
        torch.from_numpy(e2e_store.keep),
    )
    kls = []
    for model in (start, sae):
        model.downstream = DownstreamHandle(tiny_llama, HOOK, rec.input_scale)
        with torch.no_grad():
            kls.append(float(model.loss(batch, 10**6).terms["kl"]))
        model.downstream = None
    assert kls[1] < 0.8 * kls[0], kls


def test_needs_downstream_without_subject_fails(e2e_store):
    sae = E2ESAE(E2EConfig(d_in=32, d_sae=D_SAE))
    budget = BudgetSpec(train_tokens=16, batch_size=16, d_sae=D_SAE)
    with pytest.raises(TrainingFailed, match="my_e2e_sae"):
        train(Member(sae, "my_e2e_sae", 1e-3), e2e_store, budget, seed=0)
