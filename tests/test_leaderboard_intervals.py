"""Seed intervals in the leaderboard's machine-readable outputs (CSV and JSON).

A hand-built run with three seeds per setting: every expected mean and interval is
computed here from the numbers written into the records, with scipy's Student t (not
dictbench's quantile table), and compared with what pandas reads back.
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from run_folders import make_failed_sae, make_sae, write_run_json  # noqa: E402

from dictbench.cli import main  # noqa: E402
from dictbench.report import leaderboard as lb  # noqa: E402

stats = pytest.importorskip("scipy.stats")

# method -> setting -> per-seed (l0, explained_variance); seeds 0, 1, 2
SWEEPS = {
    "l1": {
        "l1-k=1": [(10.0, 0.70), (12.0, 0.73), (11.0, 0.71)],
        "l1-k=2": [(40.0, 0.80), (44.0, 0.84), (38.0, 0.79)],
    },
    "gated": {
        "gated-k=1": [(9.0, 0.75), (10.0, 0.78), (9.5, 0.74)],
        "gated-k=2": [(35.0, 0.86), (37.0, 0.85), (30.0, 0.88)],
    },
}
TWO_SEEDS = [(20.0, 0.60), (22.0, 0.66)]  # topk-k=1: seeds 0 and 1 only
TARGET = 20.0


def t_interval(values: list[float]) -> tuple[float, float, float, float]:
    """mean, sd, low, high of the two-sided 95% t-interval for the mean (scipy)."""
    v = np.asarray(values, dtype=np.float64)
    mean, sd = v.mean(), v.std(ddof=1)
    half = stats.t.ppf(0.975, len(v) - 1) * sd / math.sqrt(len(v))
    return mean, sd, mean - half, mean + half


def table_slack(values: list[float]) -> float:
    """dictbench's t quantiles have 3 decimals: the bound may move by 5e-4 * se."""
    return 5e-4 * np.std(values, ddof=1) / math.sqrt(len(values)) + 1e-12


def loglin(x: float, x0: float, y0: float, x1: float, y1: float) -> float:
    return y0 + (y1 - y0) * (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))


@pytest.fixture(scope="module")
def seeded_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("intervals") / "seeded"
    for method, settings in SWEEPS.items():
        for setting, per_seed in settings.items():
            for seed, (l0, ev) in enumerate(per_seed):
                make_sae(run, f"{setting}@seed{seed}", method, {"l0": l0, "explained_variance": ev})
    for seed, (l0, ev) in enumerate(TWO_SEEDS):
        make_sae(run, f"topk-k=1@seed{seed}", "topk", {"l0": l0, "explained_variance": ev})
    make_failed_sae(run, "topk-k=1@seed2", "topk", "CUDA out of memory")
    write_run_json(run)
    return run


@pytest.fixture(scope="module")
def csv_frame(seeded_run, tmp_path_factory) -> pd.DataFrame:
    """What `dictbench leaderboard --format csv --output` writes, read by pandas."""
    out = tmp_path_factory.mktemp("csv") / "board.csv"
    args = ["leaderboard", str(seeded_run), "--format", "csv", "--l0", str(TARGET)]
    assert main([*args, "--metric", "explained_variance", "--output", str(out)]) == 0
    return pd.read_csv(out)


def _one(df: pd.DataFrame, **where) -> pd.Series:
    mask = np.ones(len(df), dtype=bool)
    for k, v in where.items():
        mask &= (df[k] == v).to_numpy()
    assert mask.sum() == 1, where
    return df[mask].iloc[0]


@pytest.mark.parametrize("setting", ["l1-k=1", "l1-k=2", "gated-k=1", "gated-k=2"])
def test_csv_seed_groups_are_t_intervals(csv_frame, setting):
    method = setting.split("-")[0]
    evs = [ev for _, ev in SWEEPS[method][setting]]
    mean, sd, low, high = t_interval(evs)
    row = _one(csv_frame, section="seed_group", setting=setting, metric="explained_variance")
    assert row["method"] == method and row["interval"] == "t95"
    assert (row["n_seeds"], row["n_failed"]) == (3, 0)
    assert row["mean"] == pytest.approx(mean) and row["value"] == pytest.approx(mean)
    assert row["std"] == pytest.approx(sd)
    slack = table_slack(evs)
    assert abs(row["ci_low"] - low) <= slack and abs(row["ci_high"] - high) <= slack


def test_csv_two_seeds_give_the_range_and_count_the_failed_one(csv_frame):
    row = _one(csv_frame, section="seed_group", setting="topk-k=1", metric="l0")
    assert row["interval"] == "range" and (row["n_seeds"], row["n_failed"]) == (2, 1)
    assert (row["ci_low"], row["ci_high"], row["mean"]) == pytest.approx((20.0, 22.0, 21.0))


@pytest.mark.parametrize("method", ["l1", "gated"])
def test_csv_matched_l0_over_seeds(csv_frame, method):
    (lo_setting, low_pts), (_, high_pts) = SWEEPS[method].items()
    assert lo_setting.endswith("k=1")
    per_seed = [loglin(TARGET, *a, *b) for a, b in zip(low_pts, high_pts, strict=True)]
    mean, _, low, high = t_interval(per_seed)
    row = _one(csv_frame, section="matched_l0_seeds", method=method, metric="explained_variance")
    assert row["target_l0"] == TARGET and row["n_seeds"] == 3 and row["interval"] == "t95"
    assert row["mean"] == pytest.approx(mean)
    slack = table_slack(per_seed)
    assert abs(row["ci_low"] - low) <= slack and abs(row["ci_high"] - high) <= slack


def test_csv_sae_rows_name_their_setting(csv_frame):
    row = _one(csv_frame, section="sae", sae_id="gated-k=2@seed1", metric="l0")
    assert row["setting"] == "gated-k=2" and row["value"] == 37.0
    assert pd.isna(row["ci_low"]) and pd.isna(row["n_seeds"])


def test_json_seed_groups_are_wide_and_load_into_pandas(seeded_run):
    board = lb.build(lb.load_runs([seeded_run]), ["explained_variance"], [TARGET])
    doc = json.loads(lb.render(board, "json"))
    groups = pd.DataFrame(doc["seed_groups"]).set_index("setting")
    evs = [ev for _, ev in SWEEPS["gated"]["gated-k=2"]]
    mean, sd, low, high = t_interval(evs)
    g = groups.loc["gated-k=2"]
    assert g["explained_variance_mean"] == pytest.approx(mean)
    assert g["explained_variance_std"] == pytest.approx(sd)
    slack = table_slack(evs)
    assert abs(g["explained_variance_ci_low"] - low) <= slack
    assert abs(g["explained_variance_ci_high"] - high) <= slack
    assert g["explained_variance_interval"] == "t95" and g["explained_variance_n_seeds"] == 3
    assert groups.loc["topk-k=1", "n_failed"] == 1 and groups.loc["topk-k=1", "n_saes"] == 3
    matched = pd.DataFrame(doc["matched_l0_seeds"])
    assert set(matched["method"]) == {"l1", "gated", "topk"}
    topk = _one(matched, method="topk")  # seed 0's one SAE sits at L0 20; seed 1's at 22
    assert topk["n_seeds"] == 1 and topk["interval"] == "single"


def test_without_seeds_the_columns_stay_and_the_sections_are_empty(tmp_path):
    run = tmp_path / "plain"
    make_sae(run, "l1-a", "l1", {"l0": 10.0, "explained_variance": 0.7})
    make_sae(run, "l1-b", "l1", {"l0": 40.0, "explained_variance": 0.8})
    write_run_json(run)
    board = lb.build(lb.load_runs([run]), ["explained_variance"], [TARGET])
    df = pd.read_csv(io.StringIO(lb.render(board, "csv")))
    assert set(df["section"]) == {"sae", "matched_l0"}
    assert {"setting", "n_seeds", "mean", "ci_low", "ci_high", "interval"} <= set(df.columns)
    assert df["ci_low"].isna().all()
    doc = json.loads(lb.render(board, "json"))
    assert doc["seed_groups"] == [] and doc["matched_l0_seeds"] == []
