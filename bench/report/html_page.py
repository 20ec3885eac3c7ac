"""`dictbench leaderboard --html`: one self-contained static page for a leaderboard.

Why a single file: a reader should be able to open it from disk, mail it or attach it to a
paper, with no server and no network. The data are inlined as JSON and drawn by hand-
written SVG and plain JavaScript (assets/leaderboard_page.html), so the page has no
dependency to pin and a Content-Security-Policy that forbids every fetch.

The page holds the per-SAE table (sortable, filterable), the matched-L0 tables (with seed
intervals and ties where a run used ``seeds``), an interactive Pareto plot and a panel per
SAE (latent-density histogram, training cost, autointerp explanations and windows).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

from dictbench.report import seed_stats
from dictbench.report.leaderboard import Leaderboard
from dictbench.report.leaderboard_render import json_value

TEMPLATE = "leaderboard_page.html"
DATA_MARK = "/*__DICTBENCH_DATA__*/null"
TITLE_MARK = "__DICTBENCH_TITLE__"
# Bookkeeping columns of the SAE frame that are not metrics.
_NOT_METRICS = {"run", "sae_id", "baseline", "method", "status", "error", "setting", "sae_seed"}
# Default y metric of the Pareto plot, the first one present.
_Y_DEFAULTS = ("ce_loss_recovered", "explained_variance", "fvu", "frac_recovered")
_COST = ("wall_seconds", "tokens", "flops_estimate", "steps")


def _clean(v: Any) -> Any:
    """A JSON-safe value: containers cleaned item by item, scalars as ``json_value``
    makes them (NaN/inf and pandas NA become null, numpy scalars plain)."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return json_value(v)


def _key(run: str, sae_id: str) -> str:
    return f"{run}|{sae_id}"


def _sae_rows(board: Leaderboard, metrics: list[str]) -> list[dict[str, Any]]:
    df = seed_stats.with_settings(board.saes) if not board.saes.empty else board.saes
    # The seed the records carry (context.sae_seed) wins over the id's @seed suffix.
    carried = {
        _key(run.label, rec["sae_id"]): (rec.get("context") or {}).get("sae_seed")
        for run in board.runs
        for rec in run.records
        if (rec.get("context") or {}).get("sae_seed") is not None
    }
    rows = []
    for rec in df.to_dict("records"):
        rows.append(
            {
                "key": _key(rec["run"], rec["sae_id"]),
                "run": rec["run"],
                "sae_id": rec["sae_id"],
                "setting": rec["setting"],
                "seed": _clean(carried.get(_key(rec["run"], rec["sae_id"]), rec["sae_seed"])),
                "method": rec["method"],
                "status": rec["status"],
                "error": _clean(rec.get("error")),
                "m": {m: _clean(rec.get(m)) for m in metrics},
            }
        )
    return rows


def _groups(board: Leaderboard, metrics: list[str]) -> list[dict[str, Any]]:
    """Seed groups with more than one SAE: mean and interval per metric."""
    if board.saes.empty or not seed_stats.has_seeds(board.saes):
        return []
    g = seed_stats.group_frame(board.saes, metrics)
    out = []
    for rec in g.to_dict("records"):
        if rec["n_seeds"] < 2:
            continue
        stats = {
            m: {k: _clean(rec[f"{m}_{k}"]) for k in ("mean", "std", "lo", "hi")}
            | {"kind": rec[f"{m}_kind"]}
            for m in metrics
        }
        out.append(
            {
                "run": rec["run"],
                "setting": rec["setting"],
                "method": rec["method"],
                "n_seeds": rec["n_seeds"],
                "n_failed": rec["n_failed"],
                "stats": stats,
            }
        )
    return out


def _matched(board: Leaderboard) -> dict[str, Any]:
    """The matched-L0 cells: plain (one value per method) or, with seeds, mean/interval."""
    if not board.saes.empty and seed_stats.has_seeds(board.saes):
        frame = seed_stats.matched_l0_seeds(
            board.saes, board.metrics, board.targets, board.directions
        )
        return {"seeded": True, "rows": [_clean(r) for r in frame.to_dict("records")]}
    rows = [_clean(r) for r in board.matched.to_dict("records")]
    return {"seeded": False, "rows": rows}


def _autointerp(details: dict[str, Any]) -> list[dict[str, Any]]:
    """Per scored latent: explanation, scores, error and top windows where recorded.

    A window is {"tokens": [str], "acts": [float]} (tokens with their activations); the
    page highlights the active ones. Records without windows show explanations only."""
    out = []
    for lat in details.get("latents") or []:
        if not isinstance(lat, dict):
            continue
        scores = {
            k: _clean((lat.get(k) or {}).get("balanced_accuracy"))
            for k in ("detection", "fuzzing")
            if isinstance(lat.get(k), dict)
        }
        windows = []
        for w in lat.get("top_windows") or []:
            if isinstance(w, dict) and isinstance(w.get("tokens"), list):
                acts = w.get("acts") or [0.0] * len(w["tokens"])
                windows.append({"tokens": [str(t) for t in w["tokens"]], "acts": _clean(acts)})
        out.append(
            {
                "latent": lat.get("latent"),
                "explanation": lat.get("explanation"),
                "error": lat.get("error"),
                "scores": scores,
                "windows": windows,
            }
        )
    return out


def _panels(board: Leaderboard) -> dict[str, dict[str, Any]]:
    panels: dict[str, dict[str, Any]] = {}
    for (run, sae_id), hist in board.histograms.items():
        panels.setdefault(_key(run, sae_id), {})["hist"] = _clean(hist)
    for run in board.runs:
        for rec in run.records:
            panel = panels.setdefault(_key(run.label, rec["sae_id"]), {})
            details = rec.get("details") or {}
            if rec["task"] == "training":
                cost = {k: details.get(k, rec["metrics"].get(k)) for k in _COST}
                panel["training"] = _clean({k: v for k, v in cost.items() if v is not None})
                if details.get("error"):
                    panel["error"] = str(details["error"])
            elif rec["task"] == "autointerp":
                panel["autointerp"] = _autointerp(details)
    return panels


def _context_lines(board: Leaderboard) -> list[str]:
    """One line per run: where its records were scored."""
    lines = []
    for run in board.runs:
        ctx = next((r.get("context") or {} for r in run.records if r.get("context")), {})
        facts = [f"{k} {ctx[k]}" for k in ("model", "hook", "eval_split_tokens") if ctx.get(k)]
        if ctx.get("seed") is not None:
            facts.append(f"split seed {ctx['seed']}")
        lines.append(f"{run.label}: " + ", ".join(facts))
    return lines


def page_data(board: Leaderboard, title: str = "dictbench leaderboard") -> dict[str, Any]:
    """Everything the page draws, as one JSON-safe dict."""
    cols = list(board.saes.columns) if not board.saes.empty else []
    metrics = [c for c in cols if c not in _NOT_METRICS]
    headline = [m for m in board.headline if m in metrics]
    numeric = [m for m in metrics if pd.api.types.is_numeric_dtype(board.saes[m])]
    plot_metrics = [m for m in numeric if m != "l0" and board.saes[m].notna().any()]
    y_default = next((m for m in _Y_DEFAULTS if m in plot_metrics), None)
    return {
        "title": title,
        "context": _context_lines(board),
        "headline": headline,
        "plot_metrics": plot_metrics,
        "y_default": y_default or (plot_metrics[0] if plot_metrics else None),
        "directions": {m: board.directions.get(m, "equal") for m in metrics},
        "targets": [float(t) for t in board.targets],
        "saes": _sae_rows(board, metrics),
        "groups": _groups(board, numeric),
        "matched": _matched(board),
        "panels": _panels(board),
    }


def _inline_json(data: dict[str, Any]) -> str:
    """JSON that cannot close the script element it sits in."""
    text = json.dumps(_clean(data), allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_page(board: Leaderboard, title: str = "dictbench leaderboard") -> str:
    """The page as one HTML string (write it with dictbench.io.atomic)."""
    template = resources.files("dictbench").joinpath("assets", TEMPLATE).read_text("utf-8")
    if DATA_MARK not in template:
        raise RuntimeError(f"{TEMPLATE}: the data marker is missing")
    import html

    page = template.replace(TITLE_MARK, html.escape(title))
    return page.replace(DATA_MARK, _inline_json(page_data(board, title)))


def write_page(
    runs: list[Any],
    out: str | Path,
    metrics: list[str] | None = None,
    targets: list[float] | None = None,
    allow_mixed: bool = False,
    pool_runs: bool = False,
) -> Path:
    """Build the leaderboard over ``runs`` and write its page to ``out`` atomically."""
    from dictbench.errors import UserError
    from dictbench.io import atomic
    from dictbench.report import leaderboard

    board = leaderboard.build(runs, metrics, targets, allow_mixed, pool_runs)
    title = "dictbench leaderboard: " + ", ".join(r.label for r in runs)
    out = Path(out)
    try:
        atomic.write_bytes(out, render_page(board, title).encode("utf-8"))
    except OSError as e:
        raise UserError(f"--html: cannot write '{out}' ({e.strerror})") from e
    return out
