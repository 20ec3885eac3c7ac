"""dictbench on an accelerator, without one (tests/fake_accelerator.py).

On a non-CPU device the baselines, the trainer, checkpoints and the token tasks take
their device branches (torch instead of numpy sorts, device-built masks and indices).
These tests run those branches on real data and check that they never mix devices the
way CUDA refuses, and that they compute what the CPU branches compute: every loss,
gradient, trained weight and metric against the CPU run's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_accelerator import DeviceMixError, fake_accelerator, on_cpu

from dictbench import registry
from dictbench.data.cache import ActivationStore
from dictbench.spec import BudgetSpec
from dictbench.tasks.base import TaskEnv
from dictbench.tasks.dead_latents import DeadLatentsAccumulator
from dictbench.tasks.reconstruction import ReconstructionAccumulator
from dictbench.tasks.shrinkage import ShrinkageAccumulator
from dictbench.tasks.sparsity import SparsityAccumulator
from dictbench.train import trainer
from dictbench.train.checkpoint import CheckpointPlan
from dictbench.train.lockstep import Member
from tests.method_names import downstream_methods, local_methods

pytestmark = pytest.mark.usefixtures("torch_one_thread")

LOCAL = local_methods()  # every registered method that trains on activations alone
D, D_SAE, CTX, N_WINDOWS = 8, 32, 9, 40


def build(method: str, **params) -> torch.nn.Module:
    cls = registry.get_baseline(method)
    fields = cls.config_class.__dataclass_fields__
    extra = {"k": 3} if "k" in fields else {}
    if "dead_tokens_threshold" in fields:
        extra["dead_tokens_threshold"] = 16  # AuxK acts within these short runs
    torch.manual_seed(0)
    return cls(cls.config_class(d_in=D, d_sae=D_SAE, **{**extra, **params}))


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: on_cpu(v).detach().clone() for k, v in module.state_dict().items()}


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.device.type == "cpu" and want.device.type == "cpu", what
    assert torch.allclose(got.double(), want.double(), rtol=1e-4, atol=1e-5), what


# --- the harness itself can fail --------------------------------------------------------


def test_the_fake_device_refuses_what_cuda_refuses():
    with fake_accelerator() as dev:
        a = torch.arange(3.0, device=dev)
        assert a.device.type == "meta" and float(a.sum()) == 3.0  # real data underneath
        with pytest.raises(DeviceMixError):
            a + torch.ones(3)  # a non-scalar CPU operand
        assert float((a * torch.tensor(2.0)).sum()) == 6.0  # 0-dim CPU tensors are fine
        assert float(a[torch.tensor([0, 2])].sum()) == 2.0  # CPU index tensors are fine
        with pytest.raises(DeviceMixError):
            torch.randn(3, device=dev, generator=torch.Generator().manual_seed(0))
        assert torch.equal(a.cpu(), torch.arange(3.0))
    assert torch.tensor([1.0]).device.type == "cpu"  # everything restored afterwards


# --- one step of every method, on both sides of each fast-path switch -------------------


class LinearDownstream:
    """The model after the hook for the e2e methods: logits and one residual."""

    scale = 1.0

    def __init__(self, device: str | torch.device) -> None:
        g = torch.Generator().manual_seed(3)
        self.W = (torch.randn(D, 11, generator=g) / D**0.5).to(device)

    def logits(self, acts: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return acts @ self.W

    def logits_and_residuals(self, acts, ids):
        return acts @ self.W, [acts * 2.0]

    def clean(self, batch, residuals=False):
        if residuals:
            return self.logits_and_residuals(batch.acts, batch.token_ids)
        return self.logits(batch.acts, batch.token_ids), None


def _step(sae: torch.nn.Module, device: str) -> tuple[float, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    if getattr(sae, "needs_downstream", False):
        acts = torch.randn(3, CTX, D, generator=g)
        keep = torch.tensor([False] + [True] * (CTX - 1))
        ids = torch.zeros(3, CTX, dtype=torch.long)
        sae.downstream = LinearDownstream(device)
        batch = trainer.SequenceBatch(acts.to(device), ids.to(device), keep.to(device))
    else:
        batch = (torch.randn(64, D, generator=g) * 0.9 + 0.3).to(device)
    out = sae.loss(batch, 5)
    out.total.backward()
    grads = {n: on_cpu(p.grad).clone() for n, p in sae.named_parameters() if p.grad is not None}
    return float(out.total.detach()), grads


@pytest.mark.parametrize("path", ["dense", "sparse"])
@pytest.mark.parametrize("method", [*LOCAL, *downstream_methods()])
def test_a_training_step_on_the_device_equals_the_cpu_step(method, path):
    sae = build(method).train()
    sample = torch.randn(256, D, generator=torch.Generator().manual_seed(2))
    sae.on_train_start(100, sample)
    if hasattr(sae, "tokens_since_fired"):  # AuxK-style methods
        sae.tokens_since_fired[: D_SAE // 2] = 10**6  # half dead: AuxK runs too
    if path == "sparse":  # few latents fire: the L1-family and Gated sparse kernels
        with torch.no_grad():
            for name in ("b_enc", "b_gate", "b_mag"):
                if hasattr(sae, name):
                    getattr(sae, name).sub_(3.0)
    twin = copy.deepcopy(sae)
    want_total, want_grads = _step(sae, "cpu")
    with fake_accelerator() as dev:
        twin.to(dev)
        assert twin.W_dec.device.type == "meta"
        total, grads = _step(twin, dev)
    assert total == pytest.approx(want_total, rel=1e-5, abs=1e-6)
    assert grads.keys() == want_grads.keys() and grads
    for name in grads:
        assert_close(grads[name], want_grads[name], f"{method} {path}: d{name}")


# --- training with an interrupted and resumed checkpoint, then scoring ------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(N_WINDOWS, CTX, D)).astype(np.float32)
    acts[..., :2] += 1.5  # a mean to learn (b_dec, geometric median, centring)
    tokens = rng.integers(0, 256, size=(N_WINDOWS, CTX)).astype(np.int32)
    mean = acts[:, 1:].reshape(-1, D).mean(0)
    return ActivationStore(
        path=tmp_path_factory.mktemp("fake_acc"), acts=acts, tokens=tokens, mean=mean, meta={}
    )


class _Interrupt(Exception):
    pass


def _score(sae: torch.nn.Module, store: ActivationStore, device: str) -> dict[str, float]:
    env = TaskEnv(
        eval_acts=store.acts,
        eval_token_ids=store.tokens,
        keep_positions=np.array([False] + [True] * (CTX - 1)),
        train_mean=store.mean,
        device=device,
        batch_tokens=64,
    )
    accs = [
        ReconstructionAccumulator(),
        SparsityAccumulator(),
        ShrinkageAccumulator(),
        DeadLatentsAccumulator(),
    ]
    with torch.no_grad():
        results = env.token_pass(sae.eval(), accs)
    return {k: v for r in results for k, v in r.metrics.items()}


# torch warns that loading into a "meta" parameter is a no-op; the fake device's tensors
# hold data, and the comparison below shows the load happened.
@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
@pytest.mark.parametrize("method", LOCAL)
def test_training_resuming_and_scoring_on_the_device_match_the_cpu(
    method, store, tmp_path: Path, monkeypatch
):
    budget = BudgetSpec(train_tokens=320, batch_size=16, d_sae=D_SAE, lr=1e-2)  # 20 steps
    ref = build(method)
    rec_ref = trainer.train(Member(ref, "s", 1e-2, device="cpu"), store, budget, seed=1)
    want = _score(ref, store, "cpu")

    path = tmp_path / "s.safetensors"

    log: list[str] = []

    def plan(resume: bool) -> CheckpointPlan:
        return CheckpointPlan(path, 4, {"t": 1}, resume=resume, log=log.append)

    def interrupt(name: str) -> None:
        if name == "train:s:step=13":
            raise _Interrupt(name)

    with fake_accelerator() as dev:
        monkeypatch.setattr(trainer.faults, "point", interrupt)
        with pytest.raises(_Interrupt):
            trainer.train(
                Member(build(method), "s", 1e-2, ckpt=plan(False), device=dev), store, budget, 1
            )
        monkeypatch.undo()
        sae = build(method)
        rec = trainer.train(Member(sae, "s", 1e-2, ckpt=plan(True), device=dev), store, budget, 1)
        assert sae.W_dec.device.type == "meta"
        got = _score(sae, store, dev)
    assert log == [f"s: resuming training at step 12 of 20 ({path})"]  # not a restart

    assert rec.steps == rec_ref.steps
    assert rec.train_frac_dead == pytest.approx(rec_ref.train_frac_dead)
    theirs = cpu_state(ref)
    for name, value in cpu_state(sae).items():
        assert_close(value, theirs[name], f"{method}: {name}")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), k
