"""Seed grouping, intervals and matched-L0 ranks with ties (bench/report/seed_stats.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dictbench.errors import SpecError
from dictbench.report import seed_stats
from dictbench.runner import plan_saes
from dictbench.spec import BaselineEntry, RunSpec, validate


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 30, 31, 60, 200):
        assert seed_stats.t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=3e-3)


def test_summary_t_interval_by_hand():
    s = seed_stats.summarize([1.0, 2.0, 3.0])
    # mean 2, sd 1, half width t(2)=4.303 * 1/sqrt(3)
    half = 4.303 / math.sqrt(3)
    assert s["kind"] == "t95" and s["mean"] == pytest.approx(2.0)
    assert (s["lo"], s["hi"]) == pytest.approx((2 - half, 2 + half))


def test_two_seeds_show_a_range_and_one_a_point():
    s = seed_stats.summarize([0.5, 0.7, float("nan")])
    assert s["kind"] == "range" and (s["lo"], s["hi"]) == pytest.approx((0.5, 0.7))
    assert seed_stats.summarize([0.5])["kind"] == "single"
    assert seed_stats.summarize([])["mean"] is None


def test_setting_and_seed_from_id():
    assert seed_stats.setting_of("l1-l1_coefficient=1@seed12") == "l1-l1_coefficient=1"
    assert seed_stats.seed_of("l1-l1_coefficient=1@seed12") == 12
    assert seed_stats.seed_of("l1") is None


def test_plan_one_sae_per_seed_and_ids_unchanged_without():
    spec = RunSpec(baselines=[BaselineEntry(method="l1", sweep={"l1_coefficient": [1.0, 3.0]})])
    plain = plan_saes(spec)
    assert [p.sae_id for p in plain] == ["l1-l1_coefficient=1", "l1-l1_coefficient=3"]
    assert {p.seed for p in plain} == {spec.seed}
    spec.seeds = [0, 4]
    seeded = plan_saes(spec)
    assert [(p.sae_id, p.seed) for p in seeded] == [
        ("l1-l1_coefficient=1@seed0", 0),
        ("l1-l1_coefficient=1@seed4", 4),
        ("l1-l1_coefficient=3@seed0", 0),
        ("l1-l1_coefficient=3@seed4", 4),
    ]


@pytest.mark.parametrize("seeds", [[], [1, 1], [-1]])
def test_bad_seeds_are_a_spec_error(seeds):
    spec = RunSpec(baselines=[BaselineEntry(method="l1")], tasks=["reconstruction"])
    spec.seeds = seeds
    with pytest.raises(SpecError, match="seeds"):
        validate(spec)


def _frame(rows):
    df = pd.DataFrame(rows)
    df["run"] = "r"
    df["status"] = df.get("status", "ok")
    df["method"] = df["baseline"]
    return df


def test_group_frame_pools_seeds_of_one_setting():
    df = _frame([
        {"sae_id": "a@seed0", "baseline": "a", "l0": 10.0, "explained_variance": 0.5},
        {"sae_id": "a@seed1", "baseline": "a", "l0": 12.0, "explained_variance": 0.6},
        {"sae_id": "a@seed2", "baseline": "a", "l0": 14.0, "explained_variance": 0.7},
        {"sae_id": "b", "baseline": "b", "l0": 9.0, "explained_variance": 0.4},
    ])  # fmt: skip
    g = seed_stats.group_frame(df, ["l0", "explained_variance"]).set_index("setting")
    assert g.at["a", "n_seeds"] == 3 and g.at["a", "explained_variance_mean"] == pytest.approx(0.6)
    assert g.at["a", "explained_variance_std"] == pytest.approx(0.1)
    assert g.at["b", "explained_variance_kind"] == "single"


def test_matched_l0_interpolates_each_seed_then_ties_overlaps():
    rows = []
    # method a: per seed two points (l0 10 -> v, l0 40 -> v + 0.2); at l0 20 (log midpoint)
    # each seed gives v + 0.1. b is clearly worse; c overlaps a.
    for method, base in (("a", [0.60, 0.62, 0.64]), ("b", [0.20, 0.21, 0.22]),
                         ("c", [0.61, 0.63, 0.66])):  # fmt: skip
        for s, v in enumerate(base):
            rows.append({"sae_id": f"{method}-k=1@seed{s}", "baseline": method, "l0": 10.0,
                         "explained_variance": v})  # fmt: skip
            rows.append({"sae_id": f"{method}-k=2@seed{s}", "baseline": method, "l0": 40.0,
                         "explained_variance": v + 0.2})  # fmt: skip
    df = _frame(rows)
    m = seed_stats.matched_l0_seeds(df, ["explained_variance"], [20.0]).set_index("method")
    assert m.at["a", "mean"] == pytest.approx(np.mean([0.70, 0.72, 0.74]))
    assert m.at["a", "kind"] == "t95" and m.at["a", "n_seeds"] == 3
    assert m.at["b", "rank"] == 3
    assert m.at["a", "tied"] == "c" and m.at["c", "tied"] == "a"
    assert m.at["b", "tied"] == ""


def test_cell_text():
    assert seed_stats.cell_text(0.5, 0.4, 0.6, "t95") == "0.5 [0.4, 0.6]"
    assert seed_stats.cell_text(None, None, None, "none") == "-"


def test_pareto_plot_draws_seed_error_bars(tmp_path):
    """One errorbar container per multi-seed setting, spanning the t-interval."""
    import sys
    from pathlib import Path

    from matplotlib.container import ErrorbarContainer

    from dictbench.report import leaderboard, plots

    sys.path.insert(0, str(Path(__file__).parent))
    from run_folders import make_sae, write_run_json

    run = tmp_path / "s"
    for seed, ev in enumerate([0.70, 0.71, 0.72]):
        make_sae(run, f"l1-k=1@seed{seed}", "l1", {"l0": 10.0 + seed, "explained_variance": ev})
    write_run_json(run)
    board = leaderboard.build(leaderboard.load_runs([run]))
    fig = plots.pareto_figure(board, "explained_variance", "ev", None)
    bars = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1
    half = 4.303 * 0.01 / math.sqrt(3)
    ys = np.concatenate([seg[:, 1] for seg in bars[0].lines[2][1].get_segments()])
    assert (ys.min(), ys.max()) == pytest.approx((0.71 - half, 0.71 + half))


def test_leaderboard_text_has_seed_sections_only_with_seeds(tmp_path):
    import sys
    from pathlib import Path

    from dictbench.report import leaderboard

    sys.path.insert(0, str(Path(__file__).parent))
    from run_folders import make_sae, write_run_json

    seeded, plain = tmp_path / "seeded", tmp_path / "plain"
    for seed, ev in enumerate([0.70, 0.71, 0.72]):
        make_sae(seeded, f"l1@seed{seed}", "l1", {"l0": 10.0, "explained_variance": ev})
    make_sae(plain, "l1", "l1", {"l0": 10.0, "explained_variance": 0.7})
    write_run_json(seeded)
    write_run_json(plain)
    text = leaderboard.render_text(leaderboard.build(leaderboard.load_runs([seeded])), "terminal")
    half = 4.303 * 0.01 / math.sqrt(3)
    assert "Seed groups" in text and f"0.71 [{0.71 - half:.4g}, {0.71 + half:.4g}]" in text
    text = leaderboard.render_text(leaderboard.build(leaderboard.load_runs([plain])), "terminal")
    assert "Seed groups" not in text


def test_cli_seeds_flag_sets_seeds(monkeypatch, capsys):
    from dictbench import cli, runner
    from dictbench.train import distributed

    seen = {}
    monkeypatch.setattr(runner, "run", lambda spec, **kw: seen.setdefault("seeds", spec.seeds))
    monkeypatch.setattr(distributed, "init", lambda *a, **k: None)
    monkeypatch.setattr(distributed, "shutdown", lambda *a, **k: None)
    assert cli.main(["run", "--preset", "synthetic", "--seeds", "3"]) == 0
    assert seen["seeds"] == [0, 1, 2]
    assert cli.main(["run", "--preset", "synthetic", "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err
