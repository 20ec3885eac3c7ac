"""Leaderboard: matched-L0 interpolation, ranks, mixed-context refusal, failed SAEs,
output formats. Records are built by hand; expected numbers are computed here."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from run_folders import CONTEXT, make_failed_sae, make_sae, write_run_json

from dictbench.errors import UserError
from dictbench.report import leaderboard as lb


def loglin(x: float, x0: float, y0: float, x1: float, y1: float) -> float:
    """Linear in log x between (x0, y0) and (x1, y1), written out by hand."""
    t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return y0 + t * (y1 - y0)


# --- interpolate_at -----------------------------------------------------------------------


def test_interpolation_is_linear_in_log_l0():
    l0, vals = [10.0, 40.0, 160.0], [0.5, 0.7, 0.9]
    got = lb.interpolate_at(l0, vals, [20.0, 80.0, 16.0, 100.0])
    # 20 and 80 are the geometric midpoints of their intervals: exactly half-way.
    assert got[0] == pytest.approx(0.6, abs=1e-12)
    assert got[1] == pytest.approx(0.8, abs=1e-12)
    # ln(1.6) / ln(4) = 0.339036 of the way from 0.5 to 0.7
    assert got[2] == pytest.approx(0.5 + 0.2 * 0.3390359, abs=1e-7)
    assert got[3] == pytest.approx(loglin(100, 40, 0.7, 160, 0.9), abs=1e-12)


def test_interpolation_is_never_extrapolated():
    got = lb.interpolate_at([10.0, 40.0], [0.5, 0.7], [9.999, 5.0, 40.001, 1000.0])
    assert got == [None, None, None, None]


def test_interpolation_endpoints_are_the_measured_values():
    got = lb.interpolate_at([13.3, 92.5], [0.866, 0.978], [13.3, 92.5])
    assert got == pytest.approx([0.866, 0.978], abs=1e-12)


def test_interpolation_ignores_input_order():
    a = lb.interpolate_at([160.0, 10.0, 40.0], [0.9, 0.5, 0.7], [20.0, 80.0])
    assert a == pytest.approx([0.6, 0.8], abs=1e-12)


def test_single_sae_has_a_value_only_at_its_own_l0():
    assert lb.interpolate_at([32.0], [0.7], [16.0, 32.0, 64.0]) == [None, 0.7, None]


def test_missing_values_and_bad_l0_are_dropped():
    # The NaN metric at L0 20 and the L0 of 0 must not count as points.
    got = lb.interpolate_at([0.0, 10.0, 20.0, 40.0], [0.1, 0.5, float("nan"), 0.7], [20.0, 5.0])
    assert got[0] == pytest.approx(0.6, abs=1e-12)
    assert got[1] is None


def test_saes_at_the_same_l0_are_averaged():
    got = lb.interpolate_at([10.0, 10.0, 40.0], [0.4, 0.6, 0.7], [10.0, 20.0])
    assert got == pytest.approx([0.5, 0.6], abs=1e-12)


# --- a two-method run ---------------------------------------------------------------------


def _two_method_run(root: Path) -> Path:
    run = root / "two"
    # l1: three SAEs; gated: two SAEs at higher L0. Numbers chosen by hand.
    saes = [
        ("l1-a", "l1", 10.0, 0.80, 0.70, 0.97),
        ("l1-b", "l1", 40.0, 0.90, 0.80, 0.97),
        ("l1-c", "l1", 160.0, 0.96, 0.90, 0.97),
        ("gated-a", "gated", 30.0, 0.95, 0.85, 1.0),
        ("gated-b", "gated", 120.0, 0.99, 0.93, 1.0),
    ]
    for sae, method, l0, ce, ev, rrb in saes:
        metrics = {
            "l0": l0,
            "ce_loss_recovered": ce,
            "explained_variance": ev,
            "delta_ce": 1.0 - ce,
            "relative_reconstruction_bias": rrb,
        }
        make_sae(run, sae, method, metrics, hist_counts=[0] * 20 + [5, 10, 20, 10, 5], n_dead=1)
    write_run_json(run)
    return run


def _cell(board: lb.Leaderboard, method: str, metric: str, target: float):
    m = board.matched
    row = m[(m["method"] == method) & (m["metric"] == metric) & (m["target_l0"] == target)]
    assert len(row) == 1
    return row.iloc[0]


def test_matched_l0_values_and_na(tmp_path):
    board = lb.build(lb.load_runs([_two_method_run(tmp_path)]), targets=[16, 32, 64, 128])
    ce = "ce_loss_recovered"
    assert _cell(board, "l1", ce, 16)["value"] == pytest.approx(loglin(16, 10, 0.8, 40, 0.9))
    assert _cell(board, "l1", ce, 64)["value"] == pytest.approx(loglin(64, 40, 0.9, 160, 0.96))
    assert _cell(board, "gated", ce, 64)["value"] == pytest.approx(loglin(64, 30, 0.95, 120, 0.99))
    # gated measured 30..120: 16 and 128 are outside, so n/a rather than a guess
    assert pd.isna(_cell(board, "gated", ce, 16)["value"])
    assert pd.isna(_cell(board, "gated", ce, 128)["value"])
    assert _cell(board, "gated", ce, 16)["l0_min"] == 30.0


def test_the_l0_range_shown_is_the_one_each_metric_was_interpolated_over():
    saes = pd.DataFrame(
        {
            "method": ["l1"] * 3,
            "status": ["ok"] * 3,
            "l0": [5.0, 20.0, 80.0],
            "kl": [float("nan"), 0.5, 0.2],  # not measured at L0 5
            "fvu": [0.4, 0.3, 0.2],
        }
    )
    m = lb.matched_l0_frame(saes, ["kl", "fvu"], [8.0])
    kl, fvu = (m[m["metric"] == name].iloc[0] for name in ("kl", "fvu"))
    assert (kl["l0_min"], kl["l0_max"]) == (20.0, 80.0) and pd.isna(kl["value"])
    assert (fvu["l0_min"], fvu["l0_max"]) == (5.0, 80.0)
    assert fvu["value"] == pytest.approx(loglin(8, 5, 0.4, 20, 0.3))


def test_ranks_follow_direction_and_need_two_methods(tmp_path):
    board = lb.build(lb.load_runs([_two_method_run(tmp_path)]), targets=[16, 32, 64, 128])
    # At 64 gated's CE recovered (0.9669) beats l1's (0.9203): gated 1, l1 2.
    assert _cell(board, "gated", "ce_loss_recovered", 64)["rank"] == 1
    assert _cell(board, "l1", "ce_loss_recovered", 64)["rank"] == 2
    # delta_ce is lower-is-better: gated's 1-0.9669 is lower, so gated ranks first again.
    assert _cell(board, "gated", "delta_ce", 64)["rank"] == 1
    # At 16 only l1 has a value: no rank.
    assert pd.isna(_cell(board, "l1", "ce_loss_recovered", 16)["rank"])
    ranks = board.ranks.set_index("method")
    assert ranks.loc["gated", "mean_rank"] == 1.0
    assert ranks.loc["l1", "mean_rank"] == 2.0
    # cells where both have values: L0 32 and 64, three metrics each
    assert ranks.loc["l1", "ranked_cells"] == 6


def test_terminal_table_shows_na_and_every_sae(tmp_path):
    board = lb.build(lb.load_runs([_two_method_run(tmp_path)]), targets=[16, 128])
    text = lb.render(board, "terminal")
    for sae in ("l1-a", "l1-b", "l1-c", "gated-a", "gated-b"):
        assert sae in text
    gated_line = next(
        line for line in text.splitlines() if line.startswith("gated ") and "30-120" in line
    )
    assert gated_line.split()[-2:] == ["n/a", "n/a"]


def test_same_baseline_in_two_runs_is_not_pooled(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_sae(a, "l1", "l1", {"l0": 10.0, "ce_loss_recovered": 0.8})
    make_sae(b, "l1", "l1", {"l0": 40.0, "ce_loss_recovered": 0.9})
    board = lb.build(lb.load_runs([a, b]), targets=[20.0])
    assert sorted(board.saes["method"]) == ["a/l1", "b/l1"]
    # pooled, 20 would interpolate to 0.85; separately each is a single SAE: n/a
    assert board.matched["value"].isna().all()


def test_merge_runs_pools_one_sweep_split_over_two_runs(tmp_path):
    """--merge-runs: the two single SAEs become one l1 sweep, so L0 20 interpolates
    between them, linearly in log L0 (computed by hand with ``loglin``)."""
    a, b = tmp_path / "a", tmp_path / "b"
    make_sae(a, "l1-x", "l1", {"l0": 10.0, "ce_loss_recovered": 0.8})
    make_sae(b, "l1-y", "l1", {"l0": 40.0, "ce_loss_recovered": 0.9})
    board = lb.build(lb.load_runs([a, b]), targets=[20.0], pool_runs=True)
    assert sorted(board.saes["method"]) == ["l1", "l1"]
    row = board.matched[board.matched["metric"] == "ce_loss_recovered"].iloc[0]
    assert row["value"] == pytest.approx(loglin(20.0, 10.0, 0.8, 40.0, 0.9))
    assert row["value"] == pytest.approx(0.85)


def test_merge_runs_still_refuses_incompatible_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_sae(a, "l1-x", "l1", {"l0": 10.0})
    make_sae(b, "l1-y", "l1", {"l0": 40.0}, context={"hook": "resid_post.3"})
    runs = lb.load_runs([a, b])
    with pytest.raises(UserError, match="hook point"):
        lb.build(runs, pool_runs=True)
    with pytest.raises(UserError, match="cannot be combined"):
        lb.build(runs, allow_mixed=True, pool_runs=True)


# --- mixed contexts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, named",
    [
        ({"context": {"hook": "resid_post.3"}}, "hook point (context.hook)"),
        ({"context": {"model": "gpt2"}}, "subject model (context.model)"),
        (
            {"context": {"corpus": {**CONTEXT["corpus"], "eval_fraction": 0.2}}},
            "context.corpus.eval_fraction",
        ),
        ({"context": {"eval_split_tokens": 8253}}, "evaluation token count"),
        ({"eval_tokens": {"downstream": 8190}}, "eval_tokens[downstream]"),
    ],
)
def test_mixed_contexts_are_refused_naming_the_field(tmp_path, change, named):
    a, b = tmp_path / "a", tmp_path / "b"
    metrics = {"l0": 10.0, "ce_loss_recovered": 0.8}
    make_sae(a, "l1", "l1", metrics)
    make_sae(b, "gated", "gated", metrics, **change)
    runs = lb.load_runs([a, b])
    with pytest.raises(UserError) as err:
        lb.build(runs)
    msg = str(err.value)
    assert named in msg and "--allow-mixed" in msg and "\n" not in msg
    board = lb.build(runs, allow_mixed=True)
    assert len(board.saes) == 2


def test_different_training_budget_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_sae(a, "l1", "l1", {"l0": 10.0})
    make_sae(b, "e2e", "e2e", {"l0": 20.0})
    write_run_json(a)
    write_run_json(b, train_tokens=60000)
    with pytest.raises(UserError, match=r"training budget \(budget.train_tokens\)"):
        lb.build(lb.load_runs([a, b]))


def test_same_context_from_two_runs_is_accepted(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_sae(a, "l1", "l1", {"l0": 10.0}, context={"run": "first"})
    make_sae(b, "gated", "gated", {"l0": 20.0}, context={"run": "second"})
    # training-token counts differ by a few sequences between methods: not an eval count
    make_sae(b, "e2e", "e2e", {"l0": 30.0}, eval_tokens={"training": 59944})
    board = lb.build(lb.load_runs([a, b]))
    assert sorted(board.saes["method"]) == ["e2e", "gated", "l1"]


# --- failed SAEs --------------------------------------------------------------------------


def _run_with_failure(root: Path) -> Path:
    run = root / "withfail"
    make_sae(run, "l1-a", "l1", {"l0": 10.0, "ce_loss_recovered": 0.8})
    make_sae(run, "l1-c", "l1", {"l0": 40.0, "ce_loss_recovered": 0.9})
    make_failed_sae(run, "l1-b", "l1", "loss became NaN at step 17")
    return run


def test_failed_sae_shows_as_failed_not_a_number(tmp_path):
    board = lb.build(lb.load_runs([_run_with_failure(tmp_path)]))
    row = board.saes.set_index("sae_id").loc["l1-b"]
    assert row["status"] == "failed" and "NaN at step 17" in row["error"]
    shown = lb.sae_display(board.saes).set_index("sae_id").loc["l1-b"]
    assert shown["l0"] == "failed" and shown["ce_loss_recovered"] == "failed"
    text = lb.render(board, "terminal")
    assert "loss became NaN at step 17" in text
    csv = pd.read_csv(io.StringIO(lb.render(board, "csv")))
    failed = csv[(csv["section"] == "sae") & (csv["sae_id"] == "l1-b")]
    assert len(failed) > 0
    assert (failed["status"] == "failed").all() and failed["value"].isna().all()
    doc = json.loads(lb.render(board, "json"))
    sae = next(s for s in doc["saes"] if s["sae_id"] == "l1-b")
    assert sae["status"] == "failed" and sae["l0"] is None


def test_failed_sae_does_not_enter_the_interpolation(tmp_path):
    board = lb.build(lb.load_runs([_run_with_failure(tmp_path)]), targets=[20.0])
    assert _cell(board, "l1", "ce_loss_recovered", 20.0)["value"] == pytest.approx(0.85)
    assert _cell(board, "l1", "ce_loss_recovered", 20.0)["n_saes"] == 2


def test_runner_table_marks_failed_saes(tmp_path):
    text = lb.table(_run_with_failure(tmp_path))
    line = next(x for x in text.splitlines() if x.startswith("l1-b"))
    assert "failed" in line and "nan" not in line.lower()


# --- formats ------------------------------------------------------------------------------


def test_csv_is_tidy_and_carries_the_numbers(tmp_path):
    board = lb.build(lb.load_runs([_two_method_run(tmp_path)]), targets=[64])
    df = pd.read_csv(io.StringIO(lb.render(board, "csv")))
    sae = df[(df["section"] == "sae") & (df["sae_id"] == "l1-b") & (df["metric"] == "l0")]
    assert sae["value"].tolist() == [40.0]
    matched = df[df["section"] == "matched_l0"]
    cell = matched[(matched["method"] == "l1") & (matched["metric"] == "ce_loss_recovered")]
    assert cell["value"].iloc[0] == pytest.approx(loglin(64, 40, 0.9, 160, 0.96))
    assert cell["rank"].iloc[0] == 2


def test_json_loads_into_pandas(tmp_path):
    board = lb.build(lb.load_runs([_two_method_run(tmp_path)]), targets=[16, 64])
    doc = json.loads(lb.render(board, "json"))
    saes = pd.DataFrame(doc["saes"])
    assert set(saes["sae_id"]) == {"l1-a", "l1-b", "l1-c", "gated-a", "gated-b"}
    matched = pd.DataFrame(doc["matched_l0"])
    gated16 = matched[(matched["method"] == "gated") & (matched["target_l0"] == 16)]
    assert gated16["value"].isna().all()  # n/a is null, not a number


def test_markdown_is_github_tables(tmp_path):
    board = lb.build(lb.load_runs([_two_method_run(tmp_path)]))
    md = lb.render(board, "markdown")
    assert "## SAEs" in md and "## Matched L0" in md
    assert any(line.startswith("|--") or line.startswith("|:") for line in md.splitlines())


def test_unknown_metric_and_bad_target_are_user_errors(tmp_path):
    runs = lb.load_runs([_two_method_run(tmp_path)])
    with pytest.raises(UserError, match="no record has a metric named 'nonsense'"):
        lb.build(runs, metrics=["nonsense"])
    with pytest.raises(UserError, match="positive"):
        lb.build(runs, targets=[-4.0])


def test_missing_folder_and_empty_folder(tmp_path):
    with pytest.raises(UserError, match="no such run folder"):
        lb.load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no result records"):
        lb.load_run(tmp_path / "empty")
    bad = tmp_path / "bad" / "results" / "x"
    bad.mkdir(parents=True)
    (bad / "sparsity.json").write_text("{not json")
    with pytest.raises(UserError, match="sparsity.json"):
        lb.load_run(tmp_path / "bad")


# --- the command --------------------------------------------------------------------------


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dictbench.cli", "leaderboard", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )


def test_cli_csv_and_mixed_refusal(tmp_path):
    run = _two_method_run(tmp_path)
    res = _cli(str(run), "--format", "csv", "--l0", "64")
    assert res.returncode == 0, res.stderr
    df = pd.read_csv(io.StringIO(res.stdout))
    assert set(df["section"]) == {"sae", "matched_l0"}

    other = tmp_path / "other"
    make_sae(other, "topk", "topk", {"l0": 50.0}, context={"hook": "resid_post.3"})
    res = _cli(str(run), str(other))
    assert res.returncode == 2
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "hook point" in lines[0]
    res = _cli(str(run), str(other), "--allow-mixed")
    assert res.returncode == 0 and "topk" in res.stdout


def test_cli_per_run_markdown_with_plots(tmp_path):
    run = _two_method_run(tmp_path)
    failed = _run_with_failure(tmp_path)
    out = tmp_path / "board" / "LEADERBOARD.md"
    plots = tmp_path / "board" / "plots"
    args = ["--per-run", "--format", "markdown", "--plots", str(plots), "--output", str(out)]
    res = _cli(str(run), str(failed), *args)
    assert res.returncode == 0, res.stderr
    md = out.read_text()
    assert "## two" in md and "## withfail" in md
    assert "![pareto ce loss recovered](plots/two/pareto_ce_loss_recovered.png)" in md
    assert (tmp_path / "board" / "plots" / "withfail" / "latent_density.svg").is_file()


def test_cli_help():
    res = _cli("--help")
    assert res.returncode == 0
    for flag in ("--format", "--l0", "--plots", "--allow-mixed", "--per-run"):
        assert flag in res.stdout
