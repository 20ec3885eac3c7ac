"""Noise-aware regression check: `dictbench check --noise-k K`.

Why: a reference trained with ``seeds`` measures its own reseeding noise. A change smaller
than that noise is not evidence of a regression, however tight the tolerance. With
``--noise-k K`` a metric fails only if its change the wrong way exceeds both the metric's
tolerance and K times the reference's seed standard deviation for that setting (the
reference SAEs sharing the id up to ``@seed<N>``). Improvements are judged the same way.
Settings with fewer than two trained seeds in the reference have no noise estimate and
are judged by the tolerance alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from dictbench.errors import UserError
from dictbench.report.leaderboard_load import load_run, training_error
from dictbench.report.seed_stats import setting_of

# Statuses a change within the noise band turns into "ok".
_NOISY = {"REGRESSION", "better", "CHANGED"}


def seed_stds(ref_dir: Path) -> dict[tuple[str, str, str], float]:
    """(setting, task, metric) -> sample standard deviation over the reference's seeds."""
    values: dict[tuple[str, str, str], list[float]] = {}
    failed = {r["sae_id"] for r in load_run(Path(ref_dir)).records if training_error(r)}
    for rec in load_run(Path(ref_dir)).records:
        if rec["sae_id"] in failed:
            continue
        for metric, v in rec["metrics"].items():
            if isinstance(v, (int, float)) and np.isfinite(v):
                key = (setting_of(rec["sae_id"]), rec["task"], metric)
                values.setdefault(key, []).append(float(v))
    return {k: float(np.std(v, ddof=1)) for k, v in values.items() if len(v) >= 2}


def apply(df: pd.DataFrame, ref_dir: Path, k: float) -> pd.DataFrame:
    """``df`` (check.compare's frame) with a ``noise`` column (k x seed std, where known)
    and every REGRESSION, CHANGED or better whose |change| is within it made "ok"."""
    if not (k >= 0 and np.isfinite(k)):
        raise UserError(f"--noise-k: expected a non-negative number, got {k:g}")
    stds = seed_stds(ref_dir)
    out = df.copy()
    noise = []
    for i, row in out.iterrows():
        std = stds.get((setting_of(str(row["sae_id"])), row["task"], row["metric"]))
        band = None if std is None else k * std
        noise.append(band)
        change = row["change"]
        if band is not None and row["status"] in _NOISY and pd.notna(change):
            if abs(float(change)) <= band:
                out.at[i, "status"] = "ok"
    out["noise"] = noise
    return out
