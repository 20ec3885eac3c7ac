"""Leaderboards from result records: per-SAE headline metrics, a comparison of methods
at matched L0, and ranks (pandas + tabulate).

Why matched L0: sparsity and fidelity trade off, so one SAE's number says little about
its method. Each method's sweep is interpolated (metric against log L0) at fixed target
L0 values, strictly inside the L0 range the method measured; outside it the answer is
"n/a", because extrapolating a trade-off curve invents data.

Why the refusal to mix: a metric is only comparable between records scored on the same
subject model, hook point, corpus split and number of evaluation tokens, and trained
under the same budget. ``check_compatible`` names the first field that differs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tabulate import tabulate

from dictbench.errors import UserError

HEADLINE = [
    "l0",
    "explained_variance",
    "cossim",
    "ce_loss_recovered",
    "delta_ce",
    "kl",
    "relative_reconstruction_bias",
    "frac_dead",
    # feature_recovery (synthetic runs only; absent columns are not shown)
    "frac_recovered",
    "mmcs_true_to_learned",
    "coef_corr",
    # autointerp (only when a judge was configured)
    "detection_balanced_accuracy",
    "wall_seconds",
]

# The autointerp scorers' bookkeeping metrics (tasks/autointerp.py; the scorer names are
# tasks/autointerp_config.SCORERS, not imported so the leaderboard needs no torch).
_SCORERS = ("detection", "fuzzing")
AUTOINTERP_N_SCORED = tuple(f"{s}_n_scored" for s in _SCORERS)
AUTOINTERP_N_FAILED = tuple(f"{s}_n_failed" for s in _SCORERS)
AUTOINTERP_STDS = tuple(f"{s}_{m}_std" for s in _SCORERS for m in ("balanced_accuracy", "accuracy"))

# Which way is better, per METRICS.md name. "target1": closer to 1 is better (1 means no
# shrinkage or inflation). "equal": not a quality of the SAE (a property of the model or
# the window), so any change matters and no direction is better. Sparsity (l0, l1) counts
# as lower-is-better: at equal fidelity a sparser code is the better one.
DIRECTIONS: dict[str, str] = {
    "l0": "lower",
    "l1": "lower",
    "mse": "lower",
    "fvu": "lower",
    "explained_variance": "higher",
    "cossim": "higher",
    "relative_reconstruction_bias": "target1",
    "l2_ratio": "target1",
    "ce_clean": "equal",
    "ce_zero": "equal",
    "ce_mean": "equal",
    "ce_sae": "lower",
    "ce_loss_recovered": "higher",
    "ce_loss_recovered_mean_ablation": "higher",
    "delta_ce": "lower",
    "kl": "lower",
    "frac_dead": "lower",
    "frac_alive": "higher",
    "frac_dense": "lower",
    "window_tokens": "equal",
    "tokens": "equal",
    "flops_estimate": "equal",
    "train_frac_dead": "lower",
    "wall_seconds": "lower",
    "mmcs_true_to_learned": "higher",
    "mmcs_learned_to_true": "higher",
    "frac_recovered": "higher",
    "coef_corr": "higher",
    "coef_corr_recovered": "higher",
    "coef_shrinkage": "target1",
    "detection_recall": "higher",
    "detection_precision": "higher",
    "detection_balanced_accuracy": "higher",
    "detection_accuracy": "higher",
    "fuzzing_balanced_accuracy": "higher",
    "fuzzing_accuracy": "higher",
    "autointerp_n_latents": "equal",
    # Bookkeeping beside each autointerp score: latents scored and failed (judge errors,
    # unreadable replies, sets missing a class), and the spread over latents.
    **{m: "higher" for m in AUTOINTERP_N_SCORED},
    **{m: "lower" for m in AUTOINTERP_N_FAILED},
    **{m: "equal" for m in AUTOINTERP_STDS},
}

DEFAULT_TARGET_L0 = (16.0, 32.0, 64.0, 128.0)
DEFAULT_MATCHED_METRICS = ("ce_loss_recovered", "explained_variance", "delta_ce")
FORMATS = ("terminal", "markdown", "csv", "json")

# Budget fields that make two runs' SAEs comparable (ARCHITECTURE.md, "common budget").
BUDGET_FIELDS = ("train_tokens", "batch_size", "d_sae")
# Record context fields compared across records, with the words the error uses.
CONTEXT_FIELDS = {
    "model": "subject model",
    "model_fingerprint": "subject model weights",
    "hook": "hook point",
    "corpus": "corpus split",
    "ctx_len": "corpus split (context length)",
    "seed": "corpus split (seed)",
    "eval_split_tokens": "evaluation token count",
}
TRAINING_TASK = "training"


def records_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per SAE, one column per metric (task-prefixed names are not needed:
    METRICS.md names are unique across tasks)."""
    rows: dict[str, dict[str, Any]] = {}
    for rec in records:
        row = rows.setdefault(rec["sae_id"], {"sae_id": rec["sae_id"], "baseline": rec["baseline"]})
        row.update(rec["metrics"])
    return pd.DataFrame(list(rows.values()))


def training_error(rec: dict[str, Any]) -> str | None:
    """The error of a failed training record (empty metrics, details.error), else None."""
    if rec.get("task") != TRAINING_TASK or rec.get("metrics"):
        return None
    err = (rec.get("details") or {}).get("error")
    return str(err) if err else "training failed"


# --- loading ------------------------------------------------------------------------------


@dataclass
class Run:
    """One run folder's records; ``label`` tells runs apart in tables and plots."""

    path: Path
    label: str
    records: list[dict[str, Any]]
    info: dict[str, Any] | None  # run.json, when the folder has one


def load_run(path: Path, label: str | None = None) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"'{path}': no such run folder")
    records = []
    for p in sorted((path / "results").glob("*/*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"'{p}': not a readable result record ({e})") from e
        missing = [k for k in ("sae_id", "baseline", "task", "metrics") if k not in rec]
        if missing:
            raise UserError(f"'{p}': not a result record (missing {', '.join(missing)})")
        rec["_path"] = str(p)
        records.append(rec)
    if not records:
        raise UserError(f"'{path}' holds no result records (results/<sae_id>/<task>.json)")
    info = None
    run_json = path / "run.json"
    if run_json.is_file():
        try:
            info = json.loads(run_json.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"'{run_json}': not readable JSON ({e})") from e
    return Run(path, label or path.resolve().name, records, info)


def _shard_of(run: Run) -> tuple[str, int, int] | None:
    """(sweep key, index, count) of a folder written by `dictbench run --shard I/N`.

    Shards of one sweep have identical specs apart from the output folder."""
    info = run.info or {}
    shard = info.get("shard")
    if not isinstance(shard, dict):
        return None
    spec = {k: v for k, v in (info.get("spec") or {}).items() if k != "out"}
    count = shard.get("count")
    return json.dumps([spec, count], sort_keys=True), int(shard.get("index", -1)), int(count)


def merge_shards(runs: list[Run]) -> list[Run]:
    """One Run per sharded sweep: its shard folders' records together, labelled by the
    spec's name, placed where its first shard was given. Other runs are kept as they are."""
    merged: list[Run] = []
    by_key: dict[str, Run] = {}
    seen: dict[tuple[str, int], Path] = {}
    for run in runs:
        shard = _shard_of(run)
        if shard is None:
            merged.append(run)
            continue
        key, index, count = shard
        if (key, index) in seen:
            raise UserError(
                f"shard {index}/{count} of one sweep given twice: {seen[(key, index)]} "
                f"and {run.path}"
            )
        seen[(key, index)] = run.path
        if key not in by_key:
            name = str(((run.info or {}).get("spec") or {}).get("name") or run.label)
            info = {**(run.info or {}), "shards": []}
            by_key[key] = Run(run.path, name, [], info)
            merged.append(by_key[key])
        whole = by_key[key]
        ids = {r["sae_id"] for r in whole.records}
        clash = sorted({r["sae_id"] for r in run.records} & ids)
        if clash:
            raise UserError(f"SAE '{clash[0]}' appears in two shards of one sweep ({run.path})")
        whole.records.extend(run.records)
        whole.info["shards"].append({"index": index, "count": count, "path": str(run.path)})
    return merged


def load_runs(paths: list[Path]) -> list[Run]:
    """Load run folders, labelled by folder name (by path where two names clash); the
    shard folders of one sweep (`dictbench run --shard`) become one run."""
    runs = merge_shards([load_run(Path(p)) for p in paths])
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1:
            r.label = str(r.path)
    seen = [str(r.path.resolve()) for r in runs]
    dupes = sorted({s for s in seen if seen.count(s) > 1})
    if dupes:
        raise UserError(f"run folder given twice: {dupes[0]}")
    return runs


# --- comparability ------------------------------------------------------------------------


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def _facts(run: Run, rec: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """Field key -> (words for the error, value) for one record."""
    ctx = rec.get("context") or {}
    facts: dict[str, tuple[str, Any]] = {}
    for key, words in CONTEXT_FIELDS.items():
        for sub, val in _flatten(ctx.get(key), f"context.{key}").items():
            facts[sub] = (words, val)
    if rec["task"] == "downstream":  # absent: the run's whole training cache
        facts["context.mean_ablation"] = (
            "mean-ablation baseline (training tokens averaged)",
            ctx.get("mean_ablation"),
        )
    if rec["task"] != TRAINING_TASK:  # a training record's count is training tokens
        facts[f"eval_tokens[{rec['task']}]"] = (
            f"evaluation token count of task '{rec['task']}'",
            rec.get("eval_tokens"),
        )
    budget = ((run.info or {}).get("spec") or {}).get("budget")
    if isinstance(budget, dict):
        for key in BUDGET_FIELDS:
            if key in budget:
                facts[f"budget.{key}"] = ("training budget", budget[key])
    return facts


def check_compatible(runs: list[Run]) -> None:
    """Raise a one-line UserError naming the first field on which two records differ."""
    first: dict[str, tuple[Any, str]] = {}
    for run in runs:
        for rec in run.records:
            if training_error(rec) is not None:
                continue  # a failed SAE has nothing to compare
            for key, (words, val) in _facts(run, rec).items():
                if key not in first:
                    first[key] = (val, rec["_path"])
                    continue
                ref_val, ref_path = first[key]
                if ref_val != val:
                    raise UserError(
                        f"cannot compare these records: {words} ({key}) differs: "
                        f"{ref_val!r} in {ref_path} vs {val!r} in {rec['_path']}; "
                        "pass --allow-mixed to compare them anyway"
                    )


# --- tables -------------------------------------------------------------------------------

_ID_COLS = ("run", "sae_id", "baseline", "method", "status", "error")


def sae_frame(runs: list[Run]) -> pd.DataFrame:
    """One row per (run, SAE): run, sae_id, baseline, method, status, error, metrics.

    ``method`` is the baseline name, or run/baseline where a baseline occurs in more than
    one run: sweeps from different runs are never pooled into one curve, because their
    budgets may differ.
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
    df.insert(3, "method", [b if runs_of[b] == 1 else f"{r}/{b}" for r, b in pairs])
    # A failed SAE has no number, whatever a stray record might say.
    metric_cols = [c for c in df.columns if c not in _ID_COLS]
    df.loc[df["status"] == "failed", metric_cols] = np.nan
    order = {r.label: i for i, r in enumerate(runs)}
    df["_run_order"] = df["run"].map(order)
    sort_cols = ["_run_order", "baseline"] + (["l0"] if "l0" in df else []) + ["sae_id"]
    df = df.sort_values(sort_cols, na_position="last", kind="stable")
    return df.drop(columns="_run_order").reset_index(drop=True)


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


def badness(metric: str, values: Any) -> np.ndarray:
    """Values mapped so that smaller is better, per the metric's direction (NaN kept)."""
    v = np.asarray(values, dtype=np.float64)
    direction = DIRECTIONS.get(metric, "equal")
    if direction == "higher":
        return -v
    if direction == "target1":
        return np.abs(v - 1.0)
    return v


def rankable(metric: str) -> bool:
    return DIRECTIONS.get(metric) in ("higher", "lower", "target1")


def matched_l0_frame(saes: pd.DataFrame, metrics: list[str], targets: list[float]) -> pd.DataFrame:
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
        if not rankable(metric):
            continue
        vals = group["value"].astype(float)
        if vals.notna().sum() < 2:
            continue  # a rank needs someone to be ranked against
        ranks = pd.Series(badness(metric, vals), index=group.index).rank(method="min")
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


@dataclass
class Leaderboard:
    runs: list[Run]
    saes: pd.DataFrame
    matched: pd.DataFrame
    ranks: pd.DataFrame
    metrics: list[str]
    targets: list[float]
    histograms: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)


def build(
    runs: list[Run],
    metrics: list[str] | None = None,
    targets: list[float] | None = None,
    allow_mixed: bool = False,
) -> Leaderboard:
    if not allow_mixed:
        check_compatible(runs)
    explicit = bool(metrics)
    metrics = list(metrics or DEFAULT_MATCHED_METRICS)
    targets = [float(t) for t in (targets or DEFAULT_TARGET_L0)]
    bad = [t for t in targets if not (math.isfinite(t) and t > 0)]
    if bad:
        raise UserError(f"--l0: target L0 values must be positive numbers, got {bad[0]:g}")
    saes = sae_frame(runs)
    unknown = [m for m in metrics if m not in saes.columns]
    if unknown and explicit:
        raise UserError(f"--metric: no record has a metric named '{unknown[0]}'")
    metrics = [m for m in metrics if m in saes.columns]  # defaults a run lacks are skipped
    matched = matched_l0_frame(saes, metrics, targets)
    hists = {}
    for run in runs:
        for rec in run.records:
            hist = (rec.get("details") or {}).get("log10_density_hist")
            if rec["task"] == "dead_latents" and isinstance(hist, dict):
                hists[(run.label, rec["sae_id"])] = hist
    return Leaderboard(runs, saes, matched, ranks_frame(matched), metrics, targets, hists)


# --- rendering ----------------------------------------------------------------------------


def _num(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)) or v is pd.NA:
        return "-"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.4g}"


def _l0_label(t: float) -> str:
    return f"L0={t:g}"


def sae_display(saes: pd.DataFrame, columns: list[str] | None = None) -> pd.DataFrame:
    """The per-SAE table as strings: metric cells of a failed SAE read "failed"."""
    cols = columns or [c for c in HEADLINE if c in saes.columns]
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


def _direction_words(metric: str) -> str:
    return {
        "higher": "higher is better",
        "lower": "lower is better",
        "target1": "closer to 1 is better",
    }.get(DIRECTIONS.get(metric, ""), "no better direction")


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
    parts.append(_tab(sae_display(board.saes), fmt))
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
        parts.append(f"{name} ({_direction_words(metric)})")
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
    return "\n\n".join(parts) + "\n"


def long_frame(board: Leaderboard) -> pd.DataFrame:
    """Everything in one tidy frame (CSV): a row per SAE metric and per matched cell."""
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
                    "method": s["method"],
                    "status": s["status"],
                    "metric": m,
                    "target_l0": None,
                    "value": None if pd.isna(v) else float(v),
                    "rank": None,
                }
            )
    for _, r in board.matched.iterrows():
        v = r["value"]
        rows.append(
            {
                "section": "matched_l0",
                "run": None,
                "sae_id": None,
                "method": r["method"],
                "status": "n/a" if v is None or pd.isna(v) else "ok",
                "metric": r["metric"],
                "target_l0": r["target_l0"],
                "value": None if v is None or pd.isna(v) else float(v),
                "rank": None if pd.isna(r["rank"]) else int(r["rank"]),
            }
        )
    return pd.DataFrame(rows).astype({"rank": "Int64"})


def _json_rows(df: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for rec in df.to_dict(orient="records"):
        out.append({k: _json_value(v) for k, v in rec.items()})
    return out


def _json_value(v: Any) -> Any:
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
    return json.dumps(doc, indent=2) + "\n"


def table(run_dir: Path, fmt: str = "simple") -> str:
    """The per-SAE headline table of one run (what `dictbench run` prints at the end)."""
    try:
        run = load_run(Path(run_dir))
    except UserError:
        return "(no results)"
    df = sae_frame([run])
    if df.empty:
        return "(no results)"
    return _tab(sae_display(df), fmt)
