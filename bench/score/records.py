"""Result records: one JSON file per (SAE, task), the contract later tools read.

A record carries ``metric_meta``: the task's declaration (``Task.metrics``) of each metric
it holds, so the leaderboard and ``dictbench check`` read directions and tolerances from
the record itself, whichever code wrote it."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dictbench import __version__
from dictbench.io import atomic
from dictbench.score.metric_facts import declared


def _clean(metrics: dict[str, Any]) -> dict[str, float | None]:
    # JSON has no NaN; None keeps "not defined" distinct from a number.
    out: dict[str, float | None] = {}
    for k, v in metrics.items():
        f = float(v)
        out[k] = f if math.isfinite(f) else None
    return out


@dataclass(frozen=True)
class RecordTarget:
    """One SAE's records: the run folder they go in and what each carries besides its
    task's numbers (the SAE's id, its method, the run's context, and additions to that
    context for single tasks, e.g. ``dictbench eval``'s mean-ablation source). One object
    because every record of an SAE is written with the same five."""

    run_dir: Path
    sae_id: str
    baseline: str
    context: dict[str, Any]
    task_context: dict[str, dict[str, Any]] = field(default_factory=dict)

    def context_for(self, task: str) -> dict[str, Any]:
        """The context a record of ``task`` carries."""
        return {**self.context, **self.task_context.get(task, {})}


def write_record(
    target: RecordTarget,
    task: str,
    metrics: dict[str, Any],
    details: dict[str, Any],
    eval_tokens: int,
    wall_seconds: float | None = None,
) -> Path:
    """Write ``task``'s record of ``target``'s SAE (atomically); returns its path."""
    clean = _clean(metrics)
    record = {
        "sae_id": target.sae_id,
        "baseline": target.baseline,
        "task": task,
        "metrics": clean,
        "metric_meta": declared(task, clean),
        "details": details,
        "eval_tokens": int(eval_tokens),
        "context": target.context_for(task),
        "dictbench_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if wall_seconds is not None:  # what the task cost here: the machine, not the SAE
        record["wall_seconds"] = round(float(wall_seconds), 3)
    path = target.run_dir / "results" / target.sae_id / f"{task}.json"
    atomic.write_json(path, record)
    return path


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "results").glob("*/*.json"))]
