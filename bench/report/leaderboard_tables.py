"""The per-SAE frame of a leaderboard: one row per (run, SAE), one column per metric.

Kept apart from the matched-L0 comparison (``matched_l0``) so that grouping rows (e.g.
by seed) is a change to this file alone."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from dictbench.report.leaderboard_load import Run, training_error

_ID_COLS = ("run", "sae_id", "baseline", "method", "status", "error")


def sae_frame(runs: list[Run], pool_runs: bool = False) -> pd.DataFrame:
    """One row per (run, SAE): run, sae_id, baseline, method, status, error, metrics.

    ``method`` is the baseline name, or run/baseline where a baseline occurs in more than
    one run: sweeps from different runs are not pooled into one curve unless asked
    (``pool_runs``, `--merge-runs`), because their budgets may differ. Pooling is for runs
    that split one sweep (the same spec, budget and seed, other settings), which the
    caller has checked are compatible.
    """
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for run in runs:
        for rec in run.records:
            key = (run.label, rec["sae_id"])
            row = rows.setdefault(
                key,
                {
                    "run": run.label,
                    "sae_id": rec["sae_id"],
                    "baseline": rec["baseline"],
                    "status": "ok",
                    "error": None,
                },
            )
            err = training_error(rec)
            if err is not None:
                row["status"], row["error"] = "failed", err
            row.update({k: (np.nan if v is None else v) for k, v in rec["metrics"].items()})
    df = pd.DataFrame(list(rows.values()))
    if df.empty:
        return df
    runs_of = df.groupby("baseline")["run"].nunique()
    pairs = zip(df["run"], df["baseline"], strict=True)
    df.insert(3, "method", [b if pool_runs or runs_of[b] == 1 else f"{r}/{b}" for r, b in pairs])
    # A failed SAE has no number, whatever a stray record might say.
    metric_cols = [c for c in df.columns if c not in _ID_COLS]
    df.loc[df["status"] == "failed", metric_cols] = np.nan
    order = {r.label: i for i, r in enumerate(runs)}
    df["_run_order"] = df["run"].map(order)
    sort_cols = ["_run_order", "baseline"] + (["l0"] if "l0" in df else []) + ["sae_id"]
    df = df.sort_values(sort_cols, na_position="last", kind="stable")
    return df.drop(columns="_run_order").reset_index(drop=True)


def records_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per SAE, one column per metric (task-prefixed names are not needed:
    metric names are unique across tasks)."""
    rows: dict[str, dict[str, Any]] = {}
    for rec in records:
        row = rows.setdefault(rec["sae_id"], {"sae_id": rec["sae_id"], "baseline": rec["baseline"]})
        row.update(rec["metrics"])
    return pd.DataFrame(list(rows.values()))
