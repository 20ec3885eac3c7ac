"""Seed statistics: which differences between SAEs are larger than reseeding noise.

A spec with ``seeds`` trains every setting (one method and sweep value) once per seed;
the ids say it (``l1-l1_coefficient=1@seed1``). Here the seeds of one setting are grouped:
mean, standard deviation and a 95% interval per metric. With 3 or more seeds the interval
is Student's t-interval for the mean; with 2 seeds a t-interval (12.7 standard errors
wide on each side) says nothing useful, so the min-max range of the two is shown instead
and labelled "range". With 1 seed there is no interval.

The intervals cover seed noise only (initialisation and token order under one data split,
one corpus and one subject model), not what a different corpus or model would give.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pandas as pd

from dictbench.report.matched_l0 import badness, interpolate_at, rankable

SEED_SUFFIX = re.compile(r"@seed(\d+)$")
# Two-sided 95% Student t quantiles (0.975) by degrees of freedom; above 30, 1.96 + 2.4/df
# is within 0.002 of the exact value.
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError("a t quantile needs at least one degree of freedom")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def setting_of(sae_id: str) -> str:
    """The SAE id without its ``@seed<N>`` suffix: the setting its seeds share."""
    return SEED_SUFFIX.sub("", sae_id)


def seed_of(sae_id: str) -> int | None:
    """The seed an id names, or None for an id without a seed suffix."""
    m = SEED_SUFFIX.search(sae_id)
    return int(m.group(1)) if m else None


def summarize(values: Any) -> dict[str, Any]:
    """mean, std (n-1), lo, hi, n and kind ("t95", "range", "single", "none") of the
    finite values: the interval for the mean as the module docstring describes."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "lo": None, "hi": None, "kind": "none"}
    mean = float(v.mean())
    if n == 1:
        return {"n": 1, "mean": mean, "std": None, "lo": mean, "hi": mean, "kind": "single"}
    std = float(v.std(ddof=1))
    if n == 2:
        return {
            "n": 2,
            "mean": mean,
            "std": std,
            "lo": float(v.min()),
            "hi": float(v.max()),
            "kind": "range",
        }
    half = t975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "lo": mean - half, "hi": mean + half, "kind": "t95"}


def with_settings(saes: pd.DataFrame) -> pd.DataFrame:
    """``saes`` (leaderboard.sae_frame) with ``setting`` and ``sae_seed`` columns: the seed
    from the records' ``context.sae_seed`` where present, else from the id suffix."""
    df = saes.copy()
    df["setting"] = [setting_of(s) for s in df["sae_id"]]
    from_id = [seed_of(s) for s in df["sae_id"]]
    if "sae_seed" in df:
        df["sae_seed"] = [
            i if pd.isna(r) else int(r) for r, i in zip(df["sae_seed"], from_id, strict=True)
        ]
    else:
        df["sae_seed"] = from_id
    return df


def has_seeds(saes: pd.DataFrame) -> bool:
    """Whether any setting has more than one SAE (some run used ``seeds``)."""
    if saes.empty:
        return False
    df = with_settings(saes)
    return bool((df.groupby(["run", "setting"]).size() > 1).any())


def group_frame(saes: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per (run, setting): method, n_seeds, n_failed and, per metric, its mean,
    std, lo, hi and interval kind over the setting's trained seeds."""
    df = with_settings(saes)
    rows = []
    for (run, setting), sub in df.groupby(["run", "setting"], sort=False):
        ok = sub[sub["status"] == "ok"]
        row: dict[str, Any] = {
            "run": run,
            "setting": setting,
            "method": sub["method"].iloc[0],
            "n_seeds": int(len(sub)),
            "n_failed": int((sub["status"] != "ok").sum()),
        }
        for metric in metrics:
            s = summarize(ok[metric] if metric in ok else [])
            for key in ("mean", "std", "lo", "hi"):
                row[f"{metric}_{key}"] = s[key]
            row[f"{metric}_kind"] = s["kind"]
        rows.append(row)
    return pd.DataFrame(rows)


def matched_l0_seeds(
    saes: pd.DataFrame,
    metrics: list[str],
    targets: list[float],
    directions: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Long frame: method, metric, target_l0, mean, std, lo, hi, kind, n_seeds.

    Each seed's sweep (the method's SAEs of that seed) is interpolated on its own, as
    leaderboard.interpolate_at does for one sweep, and the per-seed values at a target
    are summarised. A target outside one seed's L0 range leaves that seed out there.
    """
    df = with_settings(saes)
    ok = df[df["status"] == "ok"]
    rows = []
    for method in sorted(df["method"].unique()):
        sub = ok[ok["method"] == method]
        seeds = sub["sae_seed"].fillna(-1).astype(int)
        for metric in metrics:
            per_seed = []  # one list of per-target values per seed
            for seed in sorted(seeds.unique()):
                one = sub[seeds == seed]
                if "l0" not in one or metric not in one:
                    continue
                per_seed.append(interpolate_at(one["l0"], one[metric], targets))
            for j, t in enumerate(targets):
                vals = [s[j] for s in per_seed if s[j] is not None]
                st = summarize(vals)
                rows.append(
                    {
                        "method": method,
                        "metric": metric,
                        "target_l0": float(t),
                        **{k: st[k] for k in ("mean", "std", "lo", "hi", "kind")},
                        "n_seeds": st["n"],
                    }
                )
    cols = ["method", "metric", "target_l0", "mean", "std", "lo", "hi", "kind", "n_seeds"]
    out = pd.DataFrame(rows, columns=cols)
    return add_ranks(out, directions)


def add_ranks(matched: pd.DataFrame, directions: dict[str, str] | None = None) -> pd.DataFrame:
    """Add ``rank`` (1 = best mean, per metric and target, at least two methods) and
    ``tied``: the methods whose interval overlaps this one's at the same cell, as a
    comma-separated string ("" when the rank is clear of every other method)."""
    out = matched.copy()
    out["rank"] = pd.array([pd.NA] * len(out), dtype="Int64")
    out["tied"] = ""
    for (metric, _t), group in out.groupby(["metric", "target_l0"]):
        g = group[group["mean"].notna()]
        if not rankable(metric, directions) or len(g) < 2:
            continue
        ranks = pd.Series(badness(metric, g["mean"].astype(float), directions), index=g.index)
        out.loc[g.index, "rank"] = ranks.rank(method="min").astype("Int64")
        for i in g.index:
            others = [g.at[j, "method"] for j in g.index if j != i and overlaps(g.loc[i], g.loc[j])]
            out.at[i, "tied"] = ", ".join(others)
    return out


def overlaps(a: Any, b: Any) -> bool:
    """Whether two summaries' intervals overlap; a single-seed summary is a point, so two
    single seeds only tie when equal (no noise estimate: a difference is not "tied")."""
    return bool(a["lo"] <= b["hi"] and b["lo"] <= a["hi"])


def cell_text(mean: Any, lo: Any, hi: Any, kind: str) -> str:
    """A summary as table text: "0.812 [0.801, 0.823]" (t95), "0.812 (range 0.80-0.82)"
    for 2 seeds, the bare mean for 1, "-" for none."""
    if mean is None or (isinstance(mean, float) and not math.isfinite(mean)):
        return "-"
    if kind == "t95":
        return f"{mean:.4g} [{lo:.4g}, {hi:.4g}]"
    if kind == "range":
        return f"{mean:.4g} (range {lo:.4g}-{hi:.4g})"
    return f"{mean:.4g}"
