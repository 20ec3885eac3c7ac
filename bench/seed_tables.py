"""Leaderboard text sections for runs trained with ``seeds`` (see dictbench.seed_stats):
the seeds of each setting pooled into a mean and 95% interval, and the matched-L0
comparison made per seed, with ties where intervals overlap. Empty without seeds."""

from __future__ import annotations

from typing import Any

import pandas as pd
from tabulate import tabulate

from dictbench import seed_stats

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
