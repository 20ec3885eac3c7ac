"""`dictbench check`: direction-aware tolerances, missing and failed SAEs, overrides.

Reference and run folders are written by hand, so which rows must fail is decided
here, not by the code under test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from run_folders import make_failed_sae, make_sae

from dictbench.errors import UserError
from dictbench.report import check

BASE = {
    "l0": 40.0,
    "ce_loss_recovered": 0.90,
    "fvu": 0.20,
    "explained_variance": 0.80,
    "relative_reconstruction_bias": 0.98,
    "ce_clean": 3.5,
    "delta_ce": 1.0,
    "wall_seconds": 100.0,
}


def _pair(tmp_path: Path, changes: dict, extra_ref_sae: bool = False) -> tuple[Path, Path]:
    ref, run = tmp_path / "ref", tmp_path / "run"
    make_sae(ref, "l1", "l1", BASE)
    make_sae(run, "l1", "l1", {**BASE, **changes})
    if extra_ref_sae:
        make_sae(ref, "gated", "gated", BASE)
    return run, ref


def _status(df: pd.DataFrame, metric: str) -> str:
    rows = df[df["metric"] == metric]
    assert len(rows) == 1, rows
    return rows["status"].iloc[0]


# --- judge: one metric --------------------------------------------------------------------


@pytest.mark.parametrize(
    "direction, ref, new, expected",
    [
        ("higher", 0.90, 0.99, "better"),
        ("higher", 0.90, 0.897, "ok"),  # 0.003 down, within 0.005
        ("higher", 0.90, 0.89, "REGRESSION"),  # 0.01 down
        ("lower", 0.20, 0.10, "better"),
        ("lower", 0.20, 0.204, "ok"),
        ("lower", 0.20, 0.21, "REGRESSION"),
        ("target1", 0.98, 1.01, "better"),  # 0.02 -> 0.01 from 1: a gain beyond 0.005
        ("target1", 0.98, 0.97, "REGRESSION"),  # 0.03 from 1 against 0.02
        ("target1", 0.98, 1.024, "ok"),  # 0.024 vs 0.02: 0.004 worse, within 0.005
        ("equal", 3.5, 3.504, "ok"),
        ("equal", 3.5, 3.49, "CHANGED"),  # either way
        ("equal", 3.5, 3.51, "CHANGED"),
    ],
)
def test_judge_is_direction_aware(direction, ref, new, expected):
    assert check.judge(ref, new, check.Tolerance(direction, abs=0.005)) == expected


def test_relative_and_absolute_tolerance_take_the_larger():
    tol = check.Tolerance("lower", abs=0.02, rel=0.02)
    assert tol.allowed(5.0) == pytest.approx(0.1)
    assert tol.allowed(0.5) == pytest.approx(0.02)
    assert check.judge(5.0, 5.09, tol) == "ok"
    assert check.judge(5.0, 5.11, tol) == "REGRESSION"


def test_null_values():
    tol = check.Tolerance("higher", abs=0.01)
    assert check.judge(None, None, tol) == "ok"
    assert check.judge(0.9, None, tol) == "MISSING"
    assert check.judge(None, 0.9, tol) == "new"


# --- compare: folders ---------------------------------------------------------------------


def test_identical_run_passes(tmp_path):
    df = check.compare(*_pair(tmp_path, {}))
    assert check.failures(df).empty
    # wall_seconds is ignored by default: it measures the machine
    assert "wall_seconds" not in set(df["metric"])
    assert {"l0", "ce_loss_recovered", "fvu", "ce_clean"} <= set(df["metric"])


def test_improvements_never_fail(tmp_path):
    changes = {"ce_loss_recovered": 0.99, "fvu": 0.05, "explained_variance": 0.95, "l0": 20.0}
    changes.update(delta_ce=0.1, relative_reconstruction_bias=1.0)
    df = check.compare(*_pair(tmp_path, changes))
    assert check.failures(df).empty
    for metric in changes:
        assert _status(df, metric) == "better"


def test_regressions_fail_beyond_tolerance_only(tmp_path):
    # default tolerances: ce_loss_recovered 0.005 abs; fvu 0.005 abs; l0 max(0.5, 2%)
    changes = {"ce_loss_recovered": 0.89, "fvu": 0.203, "l0": 40.6, "wall_seconds": 900.0}
    df = check.compare(*_pair(tmp_path, changes))
    assert _status(df, "ce_loss_recovered") == "REGRESSION"
    assert _status(df, "fvu") == "ok"
    assert _status(df, "l0") == "ok"  # 0.6 up against max(0.5, 2% of 40) = 0.8 allowed
    assert set(check.failures(df)["metric"]) == {"ce_loss_recovered"}


def test_model_property_change_is_flagged_both_ways(tmp_path):
    df = check.compare(*_pair(tmp_path, {"ce_clean": 3.4}))
    assert _status(df, "ce_clean") == "CHANGED"


def test_missing_sae_task_and_metric_fail(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    make_sae(ref, "l1", "l1", BASE)
    make_sae(ref, "gated", "gated", BASE)
    make_sae(ref, "topk", "topk", BASE)
    make_sae(run, "l1", "l1", BASE)
    # gated: the downstream task is missing entirely
    downstream = ("ce_loss_recovered", "ce_clean", "delta_ce")
    make_sae(run, "gated", "gated", {k: v for k, v in BASE.items() if k not in downstream})
    # run has an SAE the reference lacks: reported, not a failure
    make_sae(run, "new-one", "l1", BASE)
    df = check.compare(run, ref)
    bad = check.failures(df)
    assert set(zip(bad["sae_id"], bad["task"], bad["status"], strict=True)) == {
        ("topk", "-", "MISSING"),
        ("gated", "downstream", "MISSING"),
    }
    assert df[df["sae_id"] == "new-one"]["status"].tolist() == ["new"]


def test_missing_metric_inside_a_task_fails(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    make_sae(ref, "l1", "l1", BASE)
    make_sae(run, "l1", "l1", {k: v for k, v in BASE.items() if k != "fvu"})
    df = check.compare(run, ref)
    assert _status(df, "fvu") == "MISSING"


def test_metric_turned_null_fails(tmp_path):
    df = check.compare(*_pair(tmp_path, {"delta_ce": None}))
    assert _status(df, "delta_ce") == "MISSING"


def test_failed_training_in_the_run_fails(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    make_sae(ref, "l1", "l1", BASE)
    make_failed_sae(run, "l1", "l1", "loss became NaN at step 3")
    df = check.compare(run, ref)
    bad = check.failures(df)
    assert bad["status"].tolist() == ["FAILED"]
    assert "NaN at step 3" in bad["run"].iloc[0]


def test_failed_in_both_is_not_a_regression(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    make_failed_sae(ref, "l1", "l1", "NaN")
    make_failed_sae(run, "l1", "l1", "NaN")
    assert check.failures(check.compare(run, ref)).empty


def test_context_mismatch_is_refused_unless_allowed(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    make_sae(ref, "l1", "l1", BASE)
    make_sae(run, "l1", "l1", BASE, context={"hook": "resid_post.3"})
    with pytest.raises(UserError, match="hook point"):
        check.compare(run, ref)
    assert check.failures(check.compare(run, ref, allow_mixed=True)).empty


def test_a_downstream_score_against_another_mean_ablation_is_refused(tmp_path):
    """`dictbench eval` without the run's training cache ablates with a smaller mean; its
    downstream records say so and are not compared with a run's as if alike."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    make_sae(ref, "l1", "l1", BASE)
    make_sae(run, "l1", "l1", BASE, context={"mean_ablation": "first 4096 training tokens"})
    with pytest.raises(UserError, match="mean-ablation baseline"):
        check.compare(run, ref)
    # Only downstream records carry the baseline: reconstruction alone still compares.
    no_ce = {
        k: v for k, v in BASE.items() if k not in ("ce_loss_recovered", "ce_clean", "delta_ce")
    }
    ref2, run2 = tmp_path / "ref2", tmp_path / "run2"
    make_sae(ref2, "l1", "l1", no_ce)
    make_sae(run2, "l1", "l1", no_ce, context={"mean_ablation": "first 4096 training tokens"})
    assert check.failures(check.compare(run2, ref2)).empty


# --- tolerances from YAML and flags -------------------------------------------------------


def test_yaml_tolerances_override_defaults(tmp_path):
    run, ref = _pair(tmp_path, {"ce_loss_recovered": 0.89, "my_score": 0.5})
    make_sae(ref, "l1", "l1", {**BASE, "my_score": 0.7})
    assert _status(check.compare(run, ref), "my_score") == "CHANGED"  # unknown: two-sided 2%
    tol_file = tmp_path / "tol.yaml"
    tol_file.write_text("ce_loss_recovered: {abs: 0.02}\nmy_score: {direction: higher, abs: 0.3}\n")
    table = check.load_tolerances(tol_file)
    assert table["ce_loss_recovered"].direction == "higher"  # kept from the defaults
    df = check.compare(run, ref, table)
    assert _status(df, "ce_loss_recovered") == "ok"
    assert _status(df, "my_score") == "ok"


def test_yaml_default_key_sets_unknown_metrics(tmp_path):
    run, ref = _pair(tmp_path, {"my_score": 0.75})
    make_sae(ref, "l1", "l1", {**BASE, "my_score": 0.7})
    tol_file = tmp_path / "tol.yaml"
    tol_file.write_text("default: {direction: higher, abs: 0.0}\n")
    assert _status(check.compare(run, ref, check.load_tolerances(tol_file)), "my_score") == (
        "better"
    )


@pytest.mark.parametrize(
    "text, named",
    [
        ("ce_loss_recovered: {abss: 0.1}\n", "unknown key 'abss'"),
        ("ce_loss_recovered: {direction: up}\n", "'up' is not one of"),
        ("ce_loss_recovered: {abs: -1}\n", "finite number >= 0"),
        ("ce_loss_recovered: {abs: lots}\n", "expected a number"),
        ("ce_loss_recovered: 0.1\n", "expected a mapping"),
        ("- a\n- b\n", "must map metric names"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_tolerance_files(tmp_path, text, named):
    path = tmp_path / "tol.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=named.replace("(", r"\(")):
        check.load_tolerances(path)


def test_flags_override_and_ignore(tmp_path):
    run, ref = _pair(tmp_path, {"ce_loss_recovered": 0.89, "fvu": 0.3})
    table = check.apply_flags(
        check.load_tolerances(None), abs_tol=["ce_loss_recovered=0.05"], ignore=["fvu"]
    )
    df = check.compare(run, ref, table)
    assert _status(df, "ce_loss_recovered") == "ok"
    assert "fvu" not in set(df["metric"])
    with pytest.raises(UserError, match="METRIC=VALUE"):
        check.apply_flags(table, abs_tol=["ce_loss_recovered"])
    with pytest.raises(UserError, match="not a number"):
        check.apply_flags(table, rel_tol=["kl=big"])


# --- the command --------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dictbench.cli", "check", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ},
    )


def test_cli_exit_codes(tmp_path):
    run, ref = _pair(tmp_path / "same", {"ce_loss_recovered": 0.95})
    res = _cli(str(run), "--reference", str(ref))
    assert res.returncode == 0, res.stderr
    assert "check passed" in res.stdout and "ce_loss_recovered" in res.stdout

    run, ref = _pair(tmp_path / "worse", {"ce_loss_recovered": 0.85})
    res = _cli(str(run), "--reference", str(ref))
    assert res.returncode == 1
    assert "check FAILED" in res.stdout and "REGRESSION" in res.stdout
    res = _cli(str(run), "--reference", str(ref), "--abs-tol", "ce_loss_recovered=0.1")
    assert res.returncode == 0, res.stdout

    res = _cli(str(run), "--reference", str(tmp_path / "nowhere"))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "no such run folder" in res.stderr


def test_cli_csv_loads_into_pandas(tmp_path):
    import io

    run, ref = _pair(tmp_path, {"fvu": 0.5})
    res = _cli(str(run), "--reference", str(ref), "--format", "csv")
    assert res.returncode == 1
    df = pd.read_csv(io.StringIO(res.stdout))
    assert df.set_index("metric").loc["fvu", "status"] == "REGRESSION"
    assert "check FAILED" in res.stderr


def test_default_l0_tolerance_is_the_larger_of_half_a_latent_and_two_percent():
    tol = check.DEFAULT_TOLERANCES["l0"]
    assert check.judge(40.0, 40.6, tol) == "ok"  # allowed max(0.5, 0.8) = 0.8
    assert check.judge(40.0, 41.0, tol) == "REGRESSION"
    assert check.judge(10.0, 10.45, tol) == "ok"  # allowed max(0.5, 0.2) = 0.5
    assert check.judge(40.0, 30.0, tol) == "better"


def test_autointerp_bookkeeping_has_directions_not_the_unknown_default():
    """Fewer failed latents is better; a score's spread over latents is not gated."""
    tol = check.DEFAULT_TOLERANCES
    assert check.judge(3.0, 0.0, tol["detection_n_failed"]) == "better"  # beyond 2
    assert check.judge(0.0, 2.0, tol["fuzzing_n_failed"]) == "ok"  # within 2 latents
    assert check.judge(0.0, 3.0, tol["fuzzing_n_failed"]) == "REGRESSION"
    assert check.judge(100.0, 97.0, tol["detection_n_scored"]) == "REGRESSION"
    assert check.judge(100.0, 100.0, tol["autointerp_n_latents"]) == "ok"
    assert check.judge(100.0, 99.0, tol["autointerp_n_latents"]) == "CHANGED"
    assert tol["detection_balanced_accuracy_std"].ignore
    assert tol["fuzzing_accuracy_std"].ignore


def test_flops_estimate_is_checked_exactly():
    """A closed form of the shapes times the token count: any change is a different run."""
    tol = check.DEFAULT_TOLERANCES["flops_estimate"]
    assert tol.allowed(1.96e11) == 0.0
    assert check.judge(1.96e11, 1.96e11, tol) == "ok"
    assert check.judge(1.96e11, 1.96e11 + 1.0, tol) == "CHANGED"


def test_every_declared_metric_has_a_direction_and_a_tolerance():
    """The leaderboard's directions and the check's tolerances come from one declaration."""
    from dictbench.report import leaderboard

    tol = check.DEFAULT_TOLERANCES
    assert set(tol) == set(leaderboard.DIRECTIONS)
    assert all(tol[m].direction == d for m, d in leaderboard.DIRECTIONS.items())
