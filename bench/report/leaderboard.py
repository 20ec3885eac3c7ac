"""Leaderboards from result records: per-SAE headline metrics, a comparison of methods
at matched L0, and ranks (pandas + tabulate).

Why matched L0: sparsity and fidelity trade off, so one SAE's number says little about
its method. Each method's sweep is interpolated (metric against log L0) at fixed target
L0 values, strictly inside the L0 range the method measured; outside it the answer is
"n/a", because extrapolating a trade-off curve invents data (``matched_l0``).

Why the refusal to mix: a metric is only comparable between records scored on the same
subject model, hook point, corpus split and number of evaluation tokens, and trained
under the same budget (``leaderboard_compat``).

Which way is better, and which columns are headlines, comes from the metrics'
declarations (``Task.metrics``), read from the records first, then from the task
registry (``metric_facts``). This module is the entry point; the pieces live in
leaderboard_load, leaderboard_compat, leaderboard_tables, matched_l0 and
leaderboard_render.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from dictbench.errors import UserError
from dictbench.report.leaderboard_compat import BUDGET_FIELDS, CONTEXT_FIELDS, check_compatible
from dictbench.report.leaderboard_defaults import (
    DEFAULT_MATCHED_METRICS,
    DEFAULT_TARGET_L0,
    FORMATS,
)
from dictbench.report.leaderboard_load import Run, load_run, load_runs, merge_shards, training_error
from dictbench.report.leaderboard_render import (
    _tab,
    long_frame,
    matched_display,
    render,
    render_text,
    sae_display,
)
from dictbench.report.leaderboard_tables import records_frame, sae_frame
from dictbench.report.matched_l0 import (
    badness,
    interpolate_at,
    matched_l0_frame,
    rankable,
    ranks_frame,
)
from dictbench.score.metric_facts import MetricFact, facts_for, headline, registered
from dictbench.score.training_metrics import TRAINING_TASK

__all__ = [
    "BUDGET_FIELDS",
    "CONTEXT_FIELDS",
    "DEFAULT_MATCHED_METRICS",
    "DEFAULT_TARGET_L0",
    "FORMATS",
    "TRAINING_TASK",
    "Leaderboard",
    "Run",
    "badness",
    "build",
    "check_compatible",
    "interpolate_at",
    "load_run",
    "load_runs",
    "long_frame",
    "matched_display",
    "matched_l0_frame",
    "merge_shards",
    "rankable",
    "ranks_frame",
    "records_frame",
    "render",
    "render_text",
    "sae_display",
    "sae_frame",
    "table",
    "training_error",
]


def __getattr__(name: str) -> Any:
    """``DIRECTIONS`` and ``HEADLINE``, derived from the registered tasks' declarations
    (computed on first use: it imports the tasks, and so torch)."""
    if name == "DIRECTIONS":
        return {n: f.metric.direction for n, f in registered().items()}
    if name == "HEADLINE":
        return headline(registered())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Leaderboard:
    runs: list[Run]
    saes: pd.DataFrame
    matched: pd.DataFrame
    ranks: pd.DataFrame
    metrics: list[str]
    targets: list[float]
    histograms: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # What the records declare about their metrics (then the registry's declarations).
    facts: dict[str, MetricFact] = field(default_factory=dict)

    @property
    def directions(self) -> dict[str, str]:
        return {n: f.metric.direction for n, f in self.facts.items()}

    @property
    def headline(self) -> list[str]:
        return headline(self.facts)


def build(
    runs: list[Run],
    metrics: list[str] | None = None,
    targets: list[float] | None = None,
    allow_mixed: bool = False,
    pool_runs: bool = False,
) -> Leaderboard:
    """The leaderboard over ``runs``; ``pool_runs`` makes each baseline's SAEs from all
    runs one sweep (`--merge-runs`), which only compatible runs may do."""
    if pool_runs and allow_mixed:
        raise UserError(
            "--merge-runs and --allow-mixed cannot be combined: a pooled sweep must come "
            "from runs with the same model, hook, corpus, evaluation and budget"
        )
    if not allow_mixed:
        check_compatible(runs)
    explicit = bool(metrics)
    metrics = list(metrics or DEFAULT_MATCHED_METRICS)
    targets = [float(t) for t in (targets or DEFAULT_TARGET_L0)]
    bad = [t for t in targets if not (math.isfinite(t) and t > 0)]
    if bad:
        raise UserError(f"--l0: target L0 values must be positive numbers, got {bad[0]:g}")
    saes = sae_frame(runs, pool_runs)
    unknown = [m for m in metrics if m not in saes.columns]
    if unknown and explicit:
        raise UserError(f"--metric: no record has a metric named '{unknown[0]}'")
    metrics = [m for m in metrics if m in saes.columns]  # defaults a run lacks are skipped
    facts = facts_for(rec for run in runs for rec in run.records)
    directions = {n: f.metric.direction for n, f in facts.items()}
    matched = matched_l0_frame(saes, metrics, targets, directions)
    hists = {}
    for run in runs:
        for rec in run.records:
            hist = (rec.get("details") or {}).get("log10_density_hist")
            if rec["task"] == "dead_latents" and isinstance(hist, dict):
                hists[(run.label, rec["sae_id"])] = hist
    ranks = ranks_frame(matched)
    return Leaderboard(runs, saes, matched, ranks, metrics, targets, hists, facts)


def table(run_dir: Path, fmt: str = "simple") -> str:
    """The per-SAE headline table of one run (what `dictbench run` prints at the end)."""
    try:
        run = load_run(Path(run_dir))
    except UserError:
        return "(no results)"
    df = sae_frame([run])
    if df.empty:
        return "(no results)"
    return _tab(sae_display(df, headline(facts_for(run.records))), fmt)
