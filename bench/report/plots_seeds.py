"""Seed intervals on the Pareto plots (bench/report/plots.py): where a setting was trained with
several seeds, its mean is drawn with error bars in both L0 and the metric (95% t-interval
for 3+ seeds, the min-max range for 2; see dictbench.report.seed_stats)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from dictbench.report import seed_stats


def draw_seed_intervals(ax: Any, saes: pd.DataFrame, metric: str, colours: dict[str, str]) -> int:
    """Draw each multi-seed setting's mean and intervals; returns how many were drawn."""
    if saes.empty or "l0" not in saes or metric not in saes or not seed_stats.has_seeds(saes):
        return 0
    groups = seed_stats.group_frame(saes, ["l0", metric])
    groups = groups[groups["n_seeds"] - groups["n_failed"] >= 2]
    drawn = 0
    for row in groups.to_dict("records"):
        x, y = row["l0_mean"], row[f"{metric}_mean"]
        if x is None or y is None or not (np.isfinite(x) and x > 0 and np.isfinite(y)):
            continue
        xerr = [[x - row["l0_lo"]], [row["l0_hi"] - x]]
        yerr = [[y - row[f"{metric}_lo"]], [row[f"{metric}_hi"] - y]]
        ax.errorbar(
            [x], [y], xerr=xerr, yerr=yerr, fmt="s", color=colours.get(row["method"], "#333"),
            markerfacecolor="white", markersize=6, capsize=3, linewidth=1.2, zorder=4,
        )  # fmt: skip
        drawn += 1
    return drawn
