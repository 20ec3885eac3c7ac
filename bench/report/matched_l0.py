"""Methods compared at matched L0: each method's sweep interpolated (metric against log
L0) at fixed target L0 values, strictly inside the L0 range it measured, then ranked.

Directions come from the metrics' declarations (``metric_facts``); ``directions`` maps
a metric to higher/lower/target1/equal, and a metric absent from it is looked up in the
task registry, else treated as having no better direction (never ranked).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd


def direction_of(metric: str, directions: dict[str, str] | None = None) -> str:
    if directions is not None and metric in directions:
        return directions[metric]
    from dictbench.score.metric_facts import registered

    fact = registered().get(metric)
    return fact.metric.direction if fact is not None else "equal"


def interpolate_at(l0: Any, values: Any, targets: Any) -> list[float | None]:
    """Metric at each target L0, linear in log L0 between a method's measured points.

    None outside [min L0, max L0] (never extrapolated). Points without a finite positive
    L0 or a finite value are dropped; SAEs at the same L0 are averaged. With one point,
    only a target equal to its L0 gets a value.
    """
    l0 = np.asarray(l0, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(l0) & (l0 > 0) & np.isfinite(values)
    l0, values = l0[ok], values[ok]
    if l0.size == 0:
        return [None for _ in targets]
    xs, inverse = np.unique(np.log(l0), return_inverse=True)
    ys = np.bincount(inverse, weights=values) / np.bincount(inverse)
    out: list[float | None] = []
    for t in targets:
        t = float(t)
        x = math.log(t) if t > 0 else -math.inf
        # a target at an endpoint must not be lost to log() rounding
        if x < xs[0] - 1e-12 or x > xs[-1] + 1e-12:
            out.append(None)
        else:
            out.append(float(np.interp(min(max(x, xs[0]), xs[-1]), xs, ys)))
    return out


def badness(metric: str, values: Any, directions: dict[str, str] | None = None) -> np.ndarray:
    """Values mapped so that smaller is better, per the metric's direction (NaN kept)."""
    v = np.asarray(values, dtype=np.float64)
    direction = direction_of(metric, directions)
    if direction == "higher":
        return -v
    if direction == "target1":
        return np.abs(v - 1.0)
    return v


def rankable(metric: str, directions: dict[str, str] | None = None) -> bool:
    return direction_of(metric, directions) in ("higher", "lower", "target1")


def matched_l0_frame(
    saes: pd.DataFrame,
    metrics: list[str],
    targets: list[float],
    directions: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Long frame: method, metric, target_l0, value (None = n/a), rank, l0_min, l0_max.

    A cell is ranked (1 = best, ties share the better rank) only where at least two
    methods have a value; a method alone at some L0 is not "first" there.
    """
    rows = []
    ok = saes[saes["status"] == "ok"] if not saes.empty else saes
    for method in sorted(saes["method"].unique()) if not saes.empty else []:
        sub = ok[ok["method"] == method]
        l0 = sub["l0"].to_numpy(dtype=float) if "l0" in sub else np.array([])
        for metric in metrics:
            vals = sub[metric].to_numpy(dtype=float) if metric in sub else np.full(len(sub), np.nan)
            interp = interpolate_at(l0, vals, targets) if l0.size else [None] * len(targets)
            # The L0 range this metric was interpolated over: SAEs with both numbers.
            finite = l0[np.isfinite(l0) & np.isfinite(vals)] if l0.size else l0
            for t, v in zip(targets, interp, strict=True):
                rows.append(
                    {
                        "method": method,
                        "metric": metric,
                        "target_l0": float(t),
                        "value": v,
                        "l0_min": float(finite.min()) if finite.size else None,
                        "l0_max": float(finite.max()) if finite.size else None,
                        "n_saes": int(len(sub)),
                    }
                )
    df = pd.DataFrame(
        rows,
        columns=["method", "metric", "target_l0", "value", "l0_min", "l0_max", "n_saes"],
    )
    df["rank"] = pd.array([pd.NA] * len(df), dtype="Int64")
    for (metric, _t), group in df.groupby(["metric", "target_l0"]):
        if not rankable(metric, directions):
            continue
        vals = group["value"].astype(float)
        if vals.notna().sum() < 2:
            continue  # a rank needs someone to be ranked against
        ranks = pd.Series(badness(metric, vals, directions), index=group.index).rank(method="min")
        df.loc[group.index, "rank"] = ranks.astype("Int64")
    return df


def ranks_frame(matched: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean rank per metric over the target L0s where it has a value, and
    over all of them. Lower is better; NaN where the method had nothing to rank."""
    if matched.empty:
        return pd.DataFrame(columns=["method", "mean_rank", "ranked_cells"])
    r = matched.dropna(subset=["rank"]).astype({"rank": float})
    methods = sorted(matched["method"].unique())
    out = pd.DataFrame({"method": methods})
    for metric in matched["metric"].unique():
        means = r[r["metric"] == metric].groupby("method")["rank"].mean()
        out[f"{metric} mean rank"] = out["method"].map(means)
    out["mean_rank"] = out["method"].map(r.groupby("method")["rank"].mean())
    out["ranked_cells"] = out["method"].map(r.groupby("method").size()).fillna(0).astype(int)
    return out.sort_values(["mean_rank", "method"], na_position="last").reset_index(drop=True)
