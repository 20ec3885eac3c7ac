"""Tables from result records (pandas + tabulate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from dictbench.records import read_records

HEADLINE = [
    "l0",
    "explained_variance",
    "cossim",
    "ce_loss_recovered",
    "delta_ce",
    "kl",
    "relative_reconstruction_bias",
    "frac_dead",
    "wall_seconds",
]


def records_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per SAE, one column per metric (task-prefixed names are not needed:
    METRICS.md names are unique across tasks)."""
    rows: dict[str, dict[str, Any]] = {}
    for rec in records:
        row = rows.setdefault(rec["sae_id"], {"sae_id": rec["sae_id"], "baseline": rec["baseline"]})
        row.update(rec["metrics"])
    return pd.DataFrame(list(rows.values()))


def table(run_dir: Path, fmt: str = "simple") -> str:
    df = records_frame(read_records(run_dir))
    if df.empty:
        return "(no results)"
    cols = ["sae_id", "baseline"] + [c for c in HEADLINE if c in df.columns]
    return tabulate(df[cols], headers="keys", tablefmt=fmt, showindex=False, floatfmt=".4g")
