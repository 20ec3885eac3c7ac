"""A task defined here, outside dictbench, with its metric declarations: its numbers get
the right directions in the leaderboard and in `dictbench check`, and no core file names
it. The records carry the declarations (``metric_meta``), so the same holds in a process
that never imports this task (its class is unregistered before reading)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from run_folders import CONTEXT, write_run_json

from dictbench import registry
from dictbench.report import check
from dictbench.report import leaderboard as lb
from dictbench.score import metric_facts
from dictbench.score.metric_meta import Metric
from dictbench.score.records import RecordTarget, write_record
from dictbench.tasks.base import Task, TaskEnv, TaskResult

NAME = "newcomer_burstiness"


class Burstiness(Task):
    """How bursty the latents fire (a made-up metric: lower is better)."""

    name = NAME
    metrics = (
        Metric("burst_score", "lower", abs_tol=0.1, headline=True),
        Metric("burst_ratio", "target1", abs_tol=0.05),
    )

    def run(self, sae: torch.nn.Module, env: TaskEnv) -> TaskResult:
        raise NotImplementedError  # never scored here: only its records are read


@pytest.fixture
def registered_task():
    registry.register_task(Burstiness)
    metric_facts.registered.cache_clear()
    yield
    registry._TASKS.pop(NAME, None)
    metric_facts.registered.cache_clear()


def _sae(run: Path, sae: str, method: str, l0: float, score: float, ratio: float) -> None:
    write_record(RecordTarget(run, sae, method, CONTEXT), "sparsity", {"l0": l0}, {}, 100)
    metrics = {"burst_score": score, "burst_ratio": ratio}
    write_record(RecordTarget(run, sae, method, CONTEXT), NAME, metrics, {}, 100)


def _two_methods(run: Path, shift: float = 0.0, ratio: float = 0.9) -> None:
    write_run_json(run)
    for i, l0 in enumerate((16.0, 64.0)):
        _sae(run, f"a{i}", "a", l0, 1.0 + shift, ratio)  # a is burstier (worse)
        _sae(run, f"b{i}", "b", l0, 0.5 + shift, ratio)


def _forget_the_class() -> None:
    registry._TASKS.pop(NAME, None)
    metric_facts.registered.cache_clear()


def test_record_carries_the_declaration(tmp_path, registered_task):
    _two_methods(tmp_path / "run")
    rec = json.loads((tmp_path / "run/results/a0" / f"{NAME}.json").read_text())
    assert rec["metric_meta"]["burst_score"]["direction"] == "lower"
    assert rec["metric_meta"]["burst_ratio"]["direction"] == "target1"
    assert rec["metric_meta"]["burst_ratio"]["abs_tol"] == 0.05


@pytest.mark.parametrize("registered_at_read", [True, False])
def test_leaderboard_ranks_by_the_declared_direction(tmp_path, registered_task, registered_at_read):
    _two_methods(tmp_path / "run")
    if not registered_at_read:
        _forget_the_class()
    board = lb.build(lb.load_runs([tmp_path / "run"]), metrics=["burst_score"], targets=[32.0])
    ranks = board.matched.set_index("method")["rank"]
    assert (int(ranks["b"]), int(ranks["a"])) == (1, 2)  # lower is better: b wins
    assert board.directions["burst_ratio"] == "target1"
    # A headline column, after the built-in tasks' (report order 100 > l0's 10).
    assert board.headline.index("burst_score") > board.headline.index("l0")
    text = lb.render(board, "terminal")
    assert "burst_score (lower is better)" in text
    sae_header = next(line for line in text.splitlines() if line.startswith("sae_id"))
    assert "burst_score" in sae_header


@pytest.mark.parametrize("registered_at_read", [True, False])
@pytest.mark.parametrize(
    "shift, ratio, score_status, ratio_status",
    [
        (0.2, 0.9, "REGRESSION", "ok"),  # burstier by more than 0.1: worse
        (-0.2, 0.98, "better", "better"),  # less bursty; ratio nearer 1 by 0.08 > 0.05
        (0.05, 0.86, "ok", "ok"),  # both within tolerance
        (0.0, 0.8, "ok", "REGRESSION"),  # ratio 0.1 further from 1
    ],
)
def test_check_judges_by_the_declared_direction(
    tmp_path, registered_task, registered_at_read, shift, ratio, score_status, ratio_status
):
    _two_methods(tmp_path / "ref")
    _two_methods(tmp_path / "run", shift=shift, ratio=ratio)
    if not registered_at_read:
        _forget_the_class()
    df = check.compare(tmp_path / "run", tmp_path / "ref")
    rows = df[(df["sae_id"] == "a0") & (df["task"] == NAME)].set_index("metric")
    assert rows.loc["burst_score", "status"] == score_status
    assert rows.loc["burst_ratio", "status"] == ratio_status
    assert rows.loc["burst_score", "tolerance"] == pytest.approx(0.1)


def test_a_record_without_metadata_falls_back_to_the_registry(tmp_path):
    """Committed reference records predate metric_meta: the registry supplies it."""
    for run, celr in (("ref", 0.9), ("run", 0.8)):
        write_run_json(tmp_path / run)
        path = write_record(
            RecordTarget(tmp_path / run, "s", "l1", CONTEXT),
            "downstream",
            {"ce_loss_recovered": celr},
            {},
            10,
        )
        rec = json.loads(path.read_text())
        del rec["metric_meta"]
        path.write_text(json.dumps(rec))
    df = check.compare(tmp_path / "run", tmp_path / "ref")
    row = df[df["metric"] == "ce_loss_recovered"].iloc[0]
    assert (row["status"], row["better"]) == ("REGRESSION", "higher")


def test_a_record_declaration_beats_the_registry(tmp_path):
    """Records are read as written: a declaration in the record wins over the registry."""
    for run, l0 in (("ref", 10.0), ("run", 30.0)):
        write_run_json(tmp_path / run)
        path = write_record(
            RecordTarget(tmp_path / run, "s", "l1", CONTEXT), "sparsity", {"l0": l0}, {}, 10
        )
        rec = json.loads(path.read_text())
        rec["metric_meta"]["l0"]["direction"] = "higher"
        path.write_text(json.dumps(rec))
    df = check.compare(tmp_path / "run", tmp_path / "ref")
    assert df[df["metric"] == "l0"].iloc[0]["status"] == "better"


def test_a_partial_tolerance_keeps_the_declared_direction(tmp_path, registered_task):
    """`{abs: 0.5}` in a tolerance file widens the tolerance only: the direction stays
    the record's (lower), so a big drop is "better", not a two-sided CHANGED."""
    _two_methods(tmp_path / "ref")
    _two_methods(tmp_path / "run", shift=-0.6)
    _forget_the_class()
    tol_file = tmp_path / "tol.yaml"
    tol_file.write_text("burst_score: {abs: 0.5}\n")
    table = check.load_tolerances(tol_file)
    df = check.compare(tmp_path / "run", tmp_path / "ref", table)
    row = df[(df["sae_id"] == "a0") & (df["metric"] == "burst_score")].iloc[0]
    assert (row["status"], row["tolerance"], row["better"]) == ("better", 0.5, "lower")
    flagged = check.apply_flags(check.load_tolerances(None), abs_tol=["burst_score=0.7"])
    df = check.compare(tmp_path / "run", tmp_path / "ref", flagged)
    row = df[(df["sae_id"] == "a0") & (df["metric"] == "burst_score")].iloc[0]
    assert (row["status"], row["better"]) == ("ok", "lower")
