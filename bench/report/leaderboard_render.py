"""Rendering a built leaderboard: terminal and markdown tables, CSV (tidy), JSON."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from dictbench.errors import UserError
from dictbench.report.leaderboard_defaults import FORMATS
from dictbench.report.leaderboard_load import Run
from dictbench.report.leaderboard_tables import _ID_COLS

if TYPE_CHECKING:
    from dictbench.report.leaderboard import Leaderboard


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)) or v is pd.NA:
        return "-"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.4g}"


def _l0_label(t: float) -> str:
    return f"L0={t:g}"


def sae_display(saes: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """The per-SAE table as strings: metric cells of a failed SAE read "failed".
    ``columns`` defaults to the registered tasks' headline metrics."""
    if columns is None:
        from dictbench.score.metric_facts import headline, registered

        columns = headline(registered())
    cols = [c for c in columns if c in saes.columns]
    ids = ["run"] if saes["run"].nunique() > 1 else []
    out = saes[ids + ["sae_id", "baseline", "status"]].copy()
    for c in cols:
        out[c] = [
            "failed" if st == "failed" else _num(v)
            for st, v in zip(saes["status"], saes[c], strict=True)
        ]
    return out


def matched_display(matched: pd.DataFrame, metric: str) -> pd.DataFrame:
    sub = matched[matched["metric"] == metric]
    rows = []
    for method, g in sub.groupby("method", sort=True):
        lo, hi = g["l0_min"].iloc[0], g["l0_max"].iloc[0]
        row = {
            "method": method,
            "SAEs": int(g["n_saes"].iloc[0]),
            "measured L0": _range(lo, hi),
        }
        for _, r in g.iterrows():
            v = r["value"]
            row[_l0_label(r["target_l0"])] = "n/a" if v is None or pd.isna(v) else _num(v)
        rows.append(row)
    return pd.DataFrame(rows)


def _range(lo: Any, hi: Any) -> str:
    if lo is None or pd.isna(lo):
        return "-"
    return _num(lo) if lo == hi else f"{_num(lo)}-{_num(hi)}"


def _direction_words(metric: str, directions: dict[str, str]) -> str:
    return {
        "higher": "higher is better",
        "lower": "lower is better",
        "target1": "closer to 1 is better",
    }.get(directions.get(metric, ""), "no better direction")


def _context_line(run: Run) -> str:
    spec = (run.info or {}).get("spec") or {}
    ctx = next((r.get("context") or {} for r in run.records if r.get("context")), {})
    budget = spec.get("budget") or {}
    ev = spec.get("eval") or {}
    parts = [
        f"model `{ctx.get('model', spec.get('model', {}).get('name', '?'))}`",
        f"hook `{ctx.get('hook', spec.get('hook', '?'))}`",
    ]
    if budget:
        parts.append(
            f"{budget.get('train_tokens', '?'):,} training tokens, "
            f"{budget.get('d_sae', '?'):,} latents, batch {budget.get('batch_size', '?')}"
        )
    if ctx.get("eval_split_tokens"):
        parts.append(f"{ctx['eval_split_tokens']:,} held-out tokens")
    if ev.get("downstream_tokens"):
        parts.append(f"{ev['downstream_tokens']:,} spliced into the model")
    return ", ".join(parts)


_TEXT_COLS = {"run", "sae_id", "baseline", "method", "status"}


def _tab(df: pd.DataFrame, fmt: str) -> str:
    """Cells are pre-formatted strings; numbers right-aligned, names left-aligned."""
    if df.empty:
        return "(none)"
    tablefmt = {"markdown": "github", "terminal": "simple"}.get(fmt, fmt)
    align = ["left" if c in _TEXT_COLS else "right" for c in df.columns]
    return tabulate(
        df,
        headers="keys",
        tablefmt=tablefmt,
        showindex=False,
        disable_numparse=True,
        colalign=align,
    )


def render_text(board: Leaderboard, fmt: str, heading_level: int = 2) -> str:
    """Terminal or GitHub-markdown tables: SAEs, matched L0 per metric, ranks."""
    md = fmt == "markdown"
    h = "#" * heading_level

    def title(text: str) -> str:
        return f"{h} {text}" if md else f"{text}\n{'=' * len(text)}"

    parts = []
    if md:
        parts.extend(f"{_context_line(r)}." for r in board.runs)
    parts.append(title("SAEs"))
    parts.append(_tab(sae_display(board.saes, board.headline), fmt))
    failed = board.saes[board.saes["status"] == "failed"]
    for _, r in failed.iterrows():
        parts.append(f"failed: {r['sae_id']}: {r['error']}")
    targets = ", ".join(f"{t:g}" for t in board.targets)
    parts.append(
        title("Matched L0")
        + "\n\n"
        + (
            f"Each method's sweep interpolated linearly in log L0 at L0 = {targets}; "
            "n/a outside the L0 range the method measured (never extrapolated)."
        )
    )
    for metric in board.metrics:
        name = f"**{metric}**" if md else metric
        parts.append(f"{name} ({_direction_words(metric, board.directions)})")
        parts.append(_tab(matched_display(board.matched, metric), fmt))
    parts.append(title("Ranks at matched L0"))
    parts.append(
        "Mean rank over the target L0s where the method and at least one other have a "
        "value (1 = best); - where it never shares an L0 with another method."
    )
    ranks = board.ranks.copy()
    if ranks.empty or not (ranks["ranked_cells"] > 0).any():
        parts.append("(nothing to rank: no two methods have a value at the same target L0)")
    else:
        for c in ranks.columns:
            if c != "method" and c != "ranked_cells":
                ranks[c] = [_num(v) for v in ranks[c]]
        ranks["ranked_cells"] = ranks["ranked_cells"].astype(str)
        parts.append(_tab(ranks, fmt))
    from dictbench.report.seed_tables import render_seed_text  # "" unless a run used seeds

    seeded = render_seed_text(board, fmt, heading_level)
    return "\n\n".join(parts + ([seeded.rstrip()] if seeded else [])) + "\n"


# The tidy CSV's columns, in order. The interval columns (``seed_tables.INTERVAL_COLS``)
# are empty except in the seed sections; they are always present so that one reader
# handles runs with and without seeds.
CSV_COLUMNS = (
    "section",
    "run",
    "sae_id",
    "setting",
    "method",
    "status",
    "metric",
    "target_l0",
    "value",
    "rank",
    "n_seeds",
    "n_failed",
    "mean",
    "std",
    "ci_low",
    "ci_high",
    "interval",
    "tied",
)


def _sae_rows(board: Leaderboard) -> list[dict[str, Any]]:
    from dictbench.report.seed_stats import setting_of

    rows = []
    metric_cols = [c for c in board.saes.columns if c not in _ID_COLS]
    for _, s in board.saes.iterrows():
        for m in metric_cols:
            v = s[m]
            if s["status"] != "failed" and pd.isna(v):
                continue
            rows.append(
                {
                    "section": "sae",
                    "run": s["run"],
                    "sae_id": s["sae_id"],
                    "setting": setting_of(s["sae_id"]),
                    "method": s["method"],
                    "status": s["status"],
                    "metric": m,
                    "value": None if pd.isna(v) else float(v),
                }
            )
    return rows


def long_frame(board: Leaderboard) -> pd.DataFrame:
    """Everything in one tidy frame (CSV): a row per SAE metric (section ``sae``), per
    matched cell (``matched_l0``) and, with seeds, per setting metric (``seed_group``)
    and per matched cell over seeds (``matched_l0_seeds``), columns ``CSV_COLUMNS``."""
    from dictbench.report.seed_tables import seed_csv_rows

    rows = _sae_rows(board)
    for _, r in board.matched.iterrows():
        v = r["value"]
        rows.append(
            {
                "section": "matched_l0",
                "method": r["method"],
                "status": "n/a" if v is None or pd.isna(v) else "ok",
                "metric": r["metric"],
                "target_l0": r["target_l0"],
                "value": None if v is None or pd.isna(v) else float(v),
                "rank": None if pd.isna(r["rank"]) else int(r["rank"]),
            }
        )
    rows.extend(seed_csv_rows(board))
    df = pd.DataFrame(rows, columns=list(CSV_COLUMNS))
    return df.astype({"rank": "Int64", "n_seeds": "Int64", "n_failed": "Int64"})


def _json_rows(df: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for rec in df.to_dict(orient="records"):
        out.append({k: json_value(v) for k, v in rec.items()})
    return out


def json_value(v: Any) -> Any:
    """A JSON-safe scalar: NaN/inf and pandas NA become null, numpy scalars plain."""
    if v is None or v is pd.NA:
        return None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return v


def render(board: Leaderboard, fmt: str) -> str:
    if fmt not in FORMATS:
        raise UserError(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
    if fmt in ("terminal", "markdown"):
        return render_text(board, fmt)
    if fmt == "csv":
        return long_frame(board).to_csv(index=False)
    doc = {
        "runs": [{"label": r.label, "path": str(r.path)} for r in board.runs],
        "target_l0": board.targets,
        "matched_metrics": board.metrics,
        "saes": _json_rows(board.saes),
        "matched_l0": _json_rows(board.matched),
        "ranks": _json_rows(board.ranks),
    }
    from dictbench.report.seed_tables import seed_json  # empty lists unless a run used seeds

    for key, rows in seed_json(board).items():
        doc[key] = [{k: json_value(v) for k, v in row.items()} for row in rows]
    return json.dumps(doc, indent=2) + "\n"
