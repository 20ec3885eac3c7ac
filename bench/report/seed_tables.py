"""Leaderboard sections for runs trained with ``seeds`` (see dictbench.report.seed_stats): the
seeds of each setting pooled into a mean and 95% interval, and the matched-L0 comparison
made per seed, with ties where intervals overlap. Empty without seeds.

The same numbers go out twice: as text (Markdown, terminal) and as rows for the CSV and
JSON outputs, so a reader with pandas gets the intervals the tables print rather than
having to recompute them (and perhaps pick another interval)."""

from __future__ import annotations

from typing import Any

import pandas as pd
from tabulate import tabulate

from dictbench.report import seed_stats

NOTE = (
    "Seeds of one setting pooled: mean [95% t-interval] with 3+ seeds, (range min-max) with "
    "2. The intervals cover reseeding noise only (initialisation and token order), not the "
    "choice of corpus or model."
)


def _tab(df: pd.DataFrame, fmt: str) -> str:
    tablefmt = {"markdown": "github", "terminal": "simple"}.get(fmt, fmt)
    return tabulate(df, headers="keys", tablefmt=tablefmt, showindex=False, disable_numparse=True)


def groups_display(board: Any) -> pd.DataFrame:
    """One row per setting: method, seeds (trained/planned) and each headline metric."""
    metrics = [m for m in board.headline if m in board.saes.columns]
    g = seed_stats.group_frame(board.saes, metrics)
    out = pd.DataFrame({"setting": g["setting"], "method": g["method"]})
    if g["run"].nunique() > 1:
        out.insert(0, "run", g["run"])
    out["seeds"] = [f"{n - f}/{n}" for n, f in zip(g["n_seeds"], g["n_failed"], strict=True)]
    for m in metrics:
        cells = zip(g[f"{m}_mean"], g[f"{m}_lo"], g[f"{m}_hi"], g[f"{m}_kind"], strict=True)
        out[m] = [seed_stats.cell_text(*c) for c in cells]
    return out


def matched_display(frame: pd.DataFrame, metric: str, targets: list[float]) -> pd.DataFrame:
    sub = frame[frame["metric"] == metric]
    rows = []
    for method in sorted(sub["method"].unique()):
        row = {"method": method}
        for t in targets:
            c = sub[(sub["method"] == method) & (sub["target_l0"] == t)]
            if c.empty or c["mean"].isna().all():
                row[f"L0={t:g}"] = "n/a"
                continue
            r = c.iloc[0]
            text = seed_stats.cell_text(r["mean"], r["lo"], r["hi"], r["kind"])
            if not pd.isna(r["rank"]):
                text += f" ({int(r['rank'])}{', tied: ' + r['tied'] if r['tied'] else ''})"
            row[f"L0={t:g}"] = text
        rows.append(row)
    return pd.DataFrame(rows)


def render_seed_text(board: Any, fmt: str, heading_level: int = 2) -> str:
    """The seed sections as text, or "" when no setting has more than one seed."""
    if board.saes.empty or not seed_stats.has_seeds(board.saes):
        return ""
    md = fmt == "markdown"

    def title(text: str) -> str:
        return f"{'#' * heading_level} {text}" if md else f"{text}\n{'=' * len(text)}"

    parts = [title("Seed groups"), NOTE, _tab(groups_display(board), fmt)]
    frame = seed_stats.matched_l0_seeds(board.saes, board.metrics, board.targets, board.directions)
    parts.append(title("Matched L0 over seeds"))
    parts.append(
        "Each seed's sweep interpolated in log L0 on its own, then pooled; (rank, 1 = best by "
        "mean; tied: methods whose intervals overlap this one's)."
    )
    for metric in board.metrics:
        parts.append(f"**{metric}**" if md else metric)
        parts.append(_tab(matched_display(frame, metric, board.targets), fmt))
    return "\n\n".join(parts) + "\n"


# --- machine-readable outputs (CSV rows, JSON lists) ------------------------------------
# A row's interval fields: ``n_seeds`` is how many seed values the mean and interval pool
# (the t-interval's n); ``interval`` names what ci_low/ci_high are, as in the text tables:
# "t95" a 95% Student t-interval for the mean (3+ seeds), "range" the min and max of two
# seeds, "single" the one value (low = high = mean), "none" no value.
INTERVAL_COLS = ("n_seeds", "n_failed", "mean", "std", "ci_low", "ci_high", "interval", "tied")


def _interval(summary: dict[str, Any]) -> dict[str, Any]:
    """A seed_stats summary under the output column names."""
    return {
        "n_seeds": summary["n"],
        "mean": summary["mean"],
        "std": summary["std"],
        "ci_low": summary["lo"],
        "ci_high": summary["hi"],
        "interval": summary["kind"],
    }


def _group_metrics(saes: pd.DataFrame) -> list[str]:
    from dictbench.report.leaderboard_tables import _ID_COLS

    skip = {*_ID_COLS, "setting", "sae_seed"}
    return [c for c in saes.columns if c not in skip and pd.api.types.is_numeric_dtype(saes[c])]


def group_summaries(board: Any) -> list[dict[str, Any]]:
    """One dict per (run, setting, metric), every numeric metric, the setting's trained
    seeds pooled; n_saes and n_failed count the setting's SAEs. [] without seeds."""
    if board.saes.empty or not seed_stats.has_seeds(board.saes):
        return []
    df = seed_stats.with_settings(board.saes)
    metrics = _group_metrics(board.saes)
    out = []
    for (run, setting), sub in df.groupby(["run", "setting"], sort=False):
        ok = sub[sub["status"] == "ok"]
        base = {
            "run": run,
            "setting": setting,
            "method": sub["method"].iloc[0],
            "n_saes": int(len(sub)),
            "n_failed": int((sub["status"] != "ok").sum()),
        }
        for m in metrics:
            out.append({**base, "metric": m, **_interval(seed_stats.summarize(ok[m]))})
    return out


def matched_summaries(board: Any) -> list[dict[str, Any]]:
    """One dict per (method, metric, target L0) of the matched-L0-over-seeds table, with
    rank and tied as the text table shows them. [] without seeds."""
    if board.saes.empty or not seed_stats.has_seeds(board.saes):
        return []
    frame = seed_stats.matched_l0_seeds(board.saes, board.metrics, board.targets, board.directions)
    out = []
    for r in frame.to_dict("records"):
        summary = {"n": r["n_seeds"], **{k: r[k] for k in ("mean", "std", "lo", "hi", "kind")}}
        rank = None if pd.isna(r["rank"]) else int(r["rank"])
        keep = {k: r[k] for k in ("method", "metric", "target_l0")}
        out.append({**keep, **_interval(summary), "rank": rank, "tied": r["tied"]})
    return out


def seed_csv_rows(board: Any) -> list[dict[str, Any]]:
    """The seed sections as rows of the tidy CSV (``leaderboard_render.long_frame``):
    section ``seed_group`` (run, setting, metric) and ``matched_l0_seeds`` (method,
    metric, target_l0); ``value`` is the mean, so one column holds every section's number."""
    rows = []
    for g in group_summaries(board):
        rows.append(
            {
                "section": "seed_group",
                **{k: g[k] for k in ("run", "setting", "method", "metric")},
                "status": "n/a" if g["mean"] is None else "ok",
                "value": g["mean"],
                **{k: g.get(k) for k in INTERVAL_COLS},
            }
        )
    for r in matched_summaries(board):
        rows.append(
            {
                "section": "matched_l0_seeds",
                "status": "n/a" if r["mean"] is None else "ok",
                "value": r["mean"],
                **r,
            }
        )
    return rows


def seed_json(board: Any) -> dict[str, list[dict[str, Any]]]:
    """The seed sections for the JSON output: ``seed_groups``, one wide row per setting
    (``<metric>_mean``, ``_std``, ``_ci_low``, ``_ci_high``, ``_interval``, ``_n_seeds``),
    and ``matched_l0_seeds``, tidy rows. Both lists are empty without seeds."""
    wide: dict[tuple[str, str], dict[str, Any]] = {}
    for g in group_summaries(board):
        row = wide.setdefault(
            (g["run"], g["setting"]),
            {k: g[k] for k in ("run", "setting", "method", "n_saes", "n_failed")},
        )
        m = g["metric"]
        for k in ("mean", "std", "ci_low", "ci_high", "interval", "n_seeds"):
            row[f"{m}_{k}"] = g[k]
    return {"seed_groups": list(wide.values()), "matched_l0_seeds": matched_summaries(board)}
