"""NaN or Inf stops that SAE (naming it and the step), keeps its last good checkpoint,
marks it failed, and the run carries on with the other SAEs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml
from synthetic_sparse import sparse_store

from dictbench import cli as dictbench_cli
from dictbench.baselines.l1 import L1SAE, L1Config
from dictbench.report.leaderboard import table
from dictbench.spec import BudgetSpec
from dictbench.train import trainer
from dictbench.train.checkpoint import CheckpointPlan, read
from dictbench.train.lockstep import Member

pytestmark = pytest.mark.usefixtures("torch_one_thread")

BATCH = 64
BUDGET = BudgetSpec(
    train_tokens=BATCH * 20, batch_size=BATCH, d_sae=32, normalize_activations=False
)


def l1() -> L1SAE:
    torch.manual_seed(0)
    return L1SAE(L1Config(d_in=64, d_sae=32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activation_stops_training_at_its_step(bad, tmp_path):
    # 20 steps of 512 tokens; the first 8192 tokens also initialise the SAE, so the bad
    # token is placed later in the order: at position 9000, i.e. in step 17
    budget = BudgetSpec(
        train_tokens=512 * 20, batch_size=512, d_sae=32, normalize_activations=False
    )
    store = sparse_store(tmp_path, budget.train_tokens)
    n_win, ctx = store.acts.shape[:2]
    flat = (np.arange(n_win)[:, None] * ctx + np.arange(1, ctx)[None, :]).reshape(-1)
    order = flat[np.random.default_rng([2, 17]).permutation(len(flat))]  # seed 2
    window, pos = divmod(int(order[9000]), ctx)
    store.acts[window, pos, 3] = bad
    path = tmp_path / "ck.safetensors"
    plan = CheckpointPlan(path, 5, {"t": 1})
    with pytest.raises(trainer.TrainingFailed) as err:
        trainer.train(Member(l1(), "my-sae", 1e-3, ckpt=plan), store, budget, seed=2)
    assert str(err.value) == "my-sae: non-finite activations in the training batch at step 17"
    assert err.value.step == 17
    tensors, meta = read(path)  # the last good checkpoint is kept, and it is good
    assert meta["step"] == 15
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("model/"))


def test_non_finite_activation_in_the_initialisation_sample_fails_before_step_0(tmp_path):
    store = sparse_store(tmp_path, BUDGET.train_tokens)
    store.acts[17, 5, 3] = float("nan")
    with pytest.raises(trainer.TrainingFailed) as err:
        trainer.train(Member(l1(), "my-sae", 1e-3), store, BUDGET, seed=2)
    assert str(err.value) == (
        "my-sae: non-finite activations in the first 1280 training tokens "
        "(the initialisation sample) before step 0"
    )
    assert err.value.step == 0


def test_non_finite_activations_with_normalisation_fail_before_step_0(tmp_path):
    store = sparse_store(tmp_path, BUDGET.train_tokens)
    store.acts[3, 4, 0] = float("nan")
    budget = BudgetSpec(train_tokens=BATCH * 20, batch_size=BATCH, d_sae=32)
    with pytest.raises(trainer.TrainingFailed, match="my-sae: non-finite activations") as err:
        trainer.train(Member(l1(), "my-sae", 1e-3), store, budget, seed=2)
    assert err.value.step == 0 and "before step 0" in str(err.value)


class WeightsGoBad(L1SAE):
    name = "weights_go_bad"

    def after_step(self) -> None:
        super().after_step()
        if getattr(self, "_steps", 0) == 6:
            with torch.no_grad():
                self.W_dec[0, 0] = float("nan")
        self._steps = getattr(self, "_steps", 0) + 1


def test_broken_weights_are_never_checkpointed(tmp_path):
    store = sparse_store(tmp_path, BUDGET.train_tokens)
    torch.manual_seed(0)
    sae = WeightsGoBad(L1Config(d_in=64, d_sae=32))
    path = tmp_path / "ck.safetensors"
    with pytest.raises(trainer.TrainingFailed) as err:
        trainer.train(
            Member(sae, "w", 1e-3, ckpt=CheckpointPlan(path, 4, {})), store, BUDGET, seed=0
        )
    # NaN after step 6: the next loss (step 7) is NaN, before the checkpoint due after step 7
    assert str(err.value) == "w: non-finite loss at step 7"
    assert read(path)[1]["step"] == 4  # the good one from after step 3 stays


def test_nan_weights_at_a_checkpoint_are_refused(tmp_path):
    store = sparse_store(tmp_path, BUDGET.train_tokens)
    torch.manual_seed(0)
    sae = WeightsGoBad(L1Config(d_in=64, d_sae=32))
    path = tmp_path / "ck.safetensors"
    # checkpoints after steps 2 and 5 pass; NaN enters at the end of step 6, and the
    # checkpoint after step 6 (every 7) refuses to save it
    with pytest.raises(trainer.TrainingFailed) as err:
        trainer.train(
            Member(sae, "w", 1e-3, ckpt=CheckpointPlan(path, 7, {})), store, BUDGET, seed=0
        )
    assert str(err.value) == "w: non-finite weights after step 6" and err.value.step == 6
    assert not path.exists()  # nothing was due before; a broken state is never written


NANBOMB = '''
import torch
from dictbench.baselines.l1 import L1SAE
from dictbench.baselines.base import LossOutput


class NaNBomb(L1SAE):
    """An L1 SAE whose loss turns NaN at step 8."""

    name = "nanbomb"

    def loss(self, batch, step):
        out = super().loss(batch, step)
        if step == 8:
            return LossOutput(out.total * float("nan"), out.terms, out.latents)
        return out
'''


@pytest.fixture
def run_with_a_failing_sae(tmp_path, tiny_spec_data, monkeypatch, capsys):
    (tmp_path / "nanbomb_mod.py").write_text(NANBOMB)
    monkeypatch.syspath_prepend(str(tmp_path))
    tiny_spec_data["baselines"] = [{"method": "nanbomb_mod:NaNBomb"}, {"method": "l1"}]
    tiny_spec_data["checkpoint_every_steps"] = 5
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec_data, sort_keys=False))
    out = tmp_path / "out"
    code = dictbench_cli.main(["run", str(spec), "--out", str(out)])
    return spec, out, code, capsys.readouterr()


def test_a_failing_sae_is_marked_failed_and_the_run_carries_on(run_with_a_failing_sae):
    _, out, code, captured = run_with_a_failing_sae
    assert code == 0, captured.err[-2000:]
    ckpt = out / "checkpoints" / "nanbomb.safetensors"
    assert (
        f"training failed: nanbomb: non-finite loss at step 8 (last good checkpoint: {ckpt})"
        in captured.out
    )
    rec = json.loads((out / "results" / "nanbomb" / "training.json").read_text())
    assert rec["details"]["status"] == "failed" and rec["details"]["failed_at_step"] == 8
    assert rec["details"]["error"] == "nanbomb: non-finite loss at step 8"
    assert rec["details"]["last_checkpoint"] == str(ckpt)
    assert sorted(p.name for p in (out / "results" / "nanbomb").iterdir()) == ["training.json"]
    assert not (out / "saes" / "nanbomb").exists()
    tensors, meta = read(ckpt)
    assert meta["step"] == 5
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("model/"))
    # the other SAE is complete
    tasks = {p.stem for p in (out / "results" / "l1").iterdir()}
    assert tasks == {
        "training",
        "sparsity",
        "reconstruction",
        "shrinkage",
        "downstream",
        "dead_latents",
    }
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["failed"] == ["nanbomb"]


def test_the_leaderboard_shows_failed_not_a_number(run_with_a_failing_sae):
    _, out, code, _ = run_with_a_failing_sae
    assert code == 0
    rows = [line for line in table(out).splitlines() if line.startswith("nanbomb")]
    assert len(rows) == 1
    cells = rows[0].split()
    assert "failed" in cells
    numbers = []
    for c in cells:
        try:
            numbers.append(float(c))
        except ValueError:
            pass
    assert not [n for n in numbers if math.isfinite(n)], rows[0]


def test_resume_does_not_retry_a_failed_sae(run_with_a_failing_sae, capsys):
    spec, out, code, _ = run_with_a_failing_sae
    before = (out / "results" / "nanbomb" / "training.json").read_bytes()
    assert dictbench_cli.main(["run", str(spec), "--out", str(out), "--resume"]) == 0
    text = capsys.readouterr().out
    assert (
        "--resume: nanbomb failed before (nanbomb: non-finite loss at step 8); not retried" in text
    )
    assert "--resume: l1 is complete; skipped" in text
    assert (out / "results" / "nanbomb" / "training.json").read_bytes() == before
    assert json.loads((out / "run.json").read_text())["failed"] == ["nanbomb"]
