"""Regression check of a run against a committed reference run.

Why direction-aware: a check that flags every change punishes improvements, so each
metric has a better direction (declared by its task, ``Task.metrics``) and only a change the wrong
way, by more than the metric's tolerance, is a regression. Metrics with no better
direction (the clean model's loss, token counts) must stay put within tolerance.

Why tolerances at all: the same seed on another CPU (other BLAS kernels, other thread
counts) sums floats in another order, and training amplifies the last bits a little.
The defaults absorb that and still catch a real change (half a percentage point of CE
loss recovered). A tolerance allows ``max(abs, rel * |reference|)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from dictbench.errors import UserError
from dictbench.report.leaderboard_compat import check_compatible
from dictbench.report.leaderboard_load import Run, load_run, training_error
from dictbench.score.metric_facts import MetricFact, facts_for, registered
from dictbench.score.metric_meta import DIRECTIONS as DIRECTION_NAMES
from dictbench.score.metric_meta import Metric
from dictbench.score.training_metrics import IGNORED_PREFIXES


@dataclass(frozen=True)
class Tolerance:
    direction: str  # higher | lower | target1 | equal
    abs: float = 0.0
    rel: float = 0.0
    ignore: bool = False

    def allowed(self, reference: float) -> float:
        return max(self.abs, self.rel * abs(reference))


def from_metric(metric: Metric) -> Tolerance:
    """A metric's declared tolerance (``Task.metrics``); ``gate=False`` means ignored."""
    return Tolerance(metric.direction, metric.abs_tol, metric.rel_tol, ignore=not metric.gate)


def _from_facts(facts: dict[str, MetricFact]) -> dict[str, Tolerance]:
    return {name: from_metric(f.metric) for name, f in facts.items()}


def default_tolerances() -> dict[str, Tolerance]:
    """Every registered task's declared tolerances (and the training record's)."""
    return _from_facts(registered())


def __getattr__(name: str) -> Any:
    # DEFAULT_TOLERANCES: derived from the declarations on first use (imports the tasks).
    if name == "DEFAULT_TOLERANCES":
        return default_tolerances()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# A metric nobody declared (neither its record nor a registered task): any change beyond
# 2% fails, until a tolerance file says which way is better.
UNKNOWN = Tolerance("equal", 1e-9, 0.02)

_YAML_KEYS = {"direction", "abs", "rel", "ignore"}


class ToleranceTable(dict):
    """Tolerances by metric, remembering which keys the user gave (``given``): at compare
    time those keys are laid over the records' own declarations, so ``{abs: 0.05}`` for
    a third-party metric keeps the direction its record declares."""

    def __init__(self, *args: Any, given: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(*args)
        self.given: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (given or {}).items()}

    def set(self, metric: str, tol: Tolerance, entry: dict[str, Any]) -> None:
        self[metric] = tol
        self.given[metric] = {**self.given.get(metric, {}), **entry}


def tolerance_for(metric: str, table: dict[str, Tolerance]) -> Tolerance:
    if metric in table:
        return table[metric]
    if metric.startswith(IGNORED_PREFIXES):
        return Tolerance("equal", ignore=True)
    return table.get("default", UNKNOWN)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: expected a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise UserError(f"{where}: expected a finite number >= 0, got {value!r}")
    return v


def _merge(base: Tolerance, entry: dict[str, Any], where: str) -> Tolerance:
    unknown = sorted(set(entry) - _YAML_KEYS)
    if unknown:
        raise UserError(
            f"{where}: unknown key '{unknown[0]}' (expected {', '.join(sorted(_YAML_KEYS))})"
        )
    out = base
    if "direction" in entry:
        if entry["direction"] not in DIRECTION_NAMES:
            raise UserError(
                f"{where}.direction: '{entry['direction']}' is not one of "
                + ", ".join(DIRECTION_NAMES)
            )
        out = replace(out, direction=entry["direction"])
    for key in ("abs", "rel"):
        if key in entry:
            out = replace(out, **{key: _number(entry[key], f"{where}.{key}")})
    if "ignore" in entry:
        if not isinstance(entry["ignore"], bool):
            raise UserError(f"{where}.ignore: expected true or false, got {entry['ignore']!r}")
        out = replace(out, ignore=entry["ignore"])
    return out


def load_tolerances(path: Path | None, table: dict[str, Tolerance] | None = None) -> dict:
    """Defaults overlaid with a YAML file mapping metric -> {direction, abs, rel, ignore}.
    Keys given replace only themselves; ``default`` sets the tolerance of unknown metrics."""
    table = _copy(default_tolerances() if table is None else table)
    if path is None:
        return table
    from dictbench.io import safe_yaml  # aliases, duplicate keys and empty files refused

    doc = safe_yaml.load_path(path, f"--tolerances: '{path}'")
    if doc is None:
        return table
    if not isinstance(doc, dict):
        raise UserError(f"--tolerances: '{path}' must map metric names to settings")
    for metric, entry in doc.items():
        where = f"{path}: {metric}"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a mapping like {{abs: 0.01}}, got {entry!r}")
        base = tolerance_for(str(metric), table)
        table.set(str(metric), _merge(base, entry, where), entry)
    return table


def apply_flags(
    table: dict[str, Tolerance],
    abs_tol: list[str] | None = None,
    rel_tol: list[str] | None = None,
    ignore: list[str] | None = None,
) -> dict[str, Tolerance]:
    """``--abs-tol METRIC=V``, ``--rel-tol METRIC=V`` and ``--ignore METRIC`` on top."""
    table = _copy(table)
    for flag, key, items in (("--abs-tol", "abs", abs_tol), ("--rel-tol", "rel", rel_tol)):
        for item in items or []:
            metric, sep, value = item.partition("=")
            if not sep or not metric:
                raise UserError(f"{flag}: expected METRIC=VALUE, got '{item}'")
            try:
                v = float(value)
            except ValueError:
                raise UserError(f"{flag} {metric}: '{value}' is not a number") from None
            merged = _merge(tolerance_for(metric, table), {key: v}, f"{flag} {metric}")
            table.set(metric, merged, {key: v})
    for metric in ignore or []:
        table.set(metric, replace(tolerance_for(metric, table), ignore=True), {"ignore": True})
    return table


# --- comparison ---------------------------------------------------------------------------

COLUMNS = [
    "sae_id",
    "task",
    "metric",
    "reference",
    "run",
    "change",
    "tolerance",
    "better",
    "status",
]
FAILING = {"REGRESSION", "MISSING", "FAILED", "CHANGED"}
_BETTER = {"higher": "higher", "lower": "lower", "target1": "nearer 1", "equal": "unchanged"}


def judge(ref: float | None, new: float | None, tol: Tolerance) -> str:
    """ok / better / REGRESSION / CHANGED (for metrics with no better direction) /
    MISSING (a number became null) / new (a null became a number)."""
    if ref is None:
        return "ok" if new is None else "new"
    if new is None:
        return "MISSING"
    allowed = tol.allowed(ref)
    if tol.direction == "equal":
        return "CHANGED" if abs(new - ref) > allowed else "ok"
    if tol.direction == "higher":
        worse, gain = ref - new, new - ref
    elif tol.direction == "lower":
        worse, gain = new - ref, ref - new
    else:  # target1
        worse = abs(new - 1.0) - abs(ref - 1.0)
        gain = -worse
    if worse > allowed:
        return "REGRESSION"
    return "better" if gain > allowed else "ok"


def _copy(table: dict[str, Tolerance]) -> ToleranceTable:
    return ToleranceTable(table, given=getattr(table, "given", None))


def _effective(ref: Run, run: Run, table: dict[str, Tolerance]) -> dict[str, Tolerance]:
    """The records' own declarations (the reference's, then the run's) over the table's
    defaults, then the user's settings on top. For a plain dict (no ``given``), an entry
    that differs from the registry's default counts as the user's."""
    declared = _from_facts(facts_for([*ref.records, *run.records]))
    out = {**table, **declared}
    given = getattr(table, "given", None)
    if given is None:
        defaults = default_tolerances()
        out.update({m: t for m, t in table.items() if defaults.get(m) != t})
        return out
    for metric, entry in given.items():
        out[metric] = _merge(tolerance_for(metric, out), entry, metric)
    return out


def _by_key(run: Run) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for rec in run.records:
        out.setdefault(rec["sae_id"], {})[rec["task"]] = rec
    return out


def _row(sae: str, task: str, metric: str, status: str, **kw: Any) -> dict[str, Any]:
    row = dict.fromkeys(COLUMNS)
    row.update(sae_id=sae, task=task, metric=metric, status=status, **kw)
    return row


def compare(
    run_dir: Path,
    ref_dir: Path,
    tolerances: dict[str, Tolerance] | None = None,
    allow_mixed: bool = False,
) -> pd.DataFrame:
    """One row per compared (SAE, task, metric), plus one per missing or failed SAE/task."""
    ref, run = load_run(Path(ref_dir), "reference"), load_run(Path(run_dir), "run")
    table = _effective(ref, run, default_tolerances() if tolerances is None else tolerances)
    if not allow_mixed:
        check_compatible([ref, run])
    ref_recs, run_recs = _by_key(ref), _by_key(run)
    rows: list[dict[str, Any]] = []
    for sae, ref_tasks in ref_recs.items():
        rows += _sae_rows(sae, ref_tasks, run_recs.get(sae), table)
    for sae in sorted(set(run_recs) - set(ref_recs)):
        rows.append(_row(sae, "-", "-", "new", reference="SAE not in reference"))
    return pd.DataFrame(rows, columns=COLUMNS)


def _sae_rows(
    sae: str,
    ref_tasks: dict[str, dict[str, Any]],
    run_tasks: dict[str, dict[str, Any]] | None,
    table: dict[str, Tolerance],
) -> list[dict[str, Any]]:
    """One SAE's rows: missing or failed in the run, or one row per compared metric."""
    if run_tasks is None:
        return [_row(sae, "-", "-", "MISSING", run="SAE not in run")]
    ref_err = training_error(ref_tasks.get("training", {}))
    run_err = training_error(run_tasks.get("training", {}))
    if run_err is not None:
        status = "ok" if ref_err is not None else "FAILED"
        return [_row(sae, "training", "-", status, reference=ref_err, run=run_err)]
    rows = []
    if ref_err is not None:
        rows.append(_row(sae, "training", "-", "better", reference=ref_err, run="trained"))
    for task, ref_rec in ref_tasks.items():
        if training_error(ref_rec) is not None:
            continue
        run_rec = run_tasks.get(task)
        if run_rec is None:
            rows.append(_row(sae, task, "-", "MISSING", run="task record not in run"))
            continue
        rows += _metric_rows(sae, task, ref_rec["metrics"], run_rec["metrics"], table)
    return rows


def _metric_rows(
    sae: str,
    task: str,
    ref_metrics: dict[str, Any],
    run_metrics: dict[str, Any],
    table: dict[str, Tolerance],
) -> list[dict[str, Any]]:
    rows = []
    for metric, ref_v in ref_metrics.items():
        tol = tolerance_for(metric, table)
        if tol.ignore:
            continue
        if metric not in run_metrics:
            rows.append(_row(sae, task, metric, "MISSING", reference=ref_v, run="absent"))
            continue
        new_v = run_metrics[metric]
        rows.append(
            _row(
                sae,
                task,
                metric,
                judge(ref_v, new_v, tol),
                reference=ref_v,
                run=new_v,
                change=None if ref_v is None or new_v is None else new_v - ref_v,
                tolerance=None if ref_v is None else tol.allowed(ref_v),
                better=_BETTER[tol.direction],
            )
        )
    return rows


def failures(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"].isin(FAILING)]


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def display(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy().astype(object)
    for c in ("reference", "run", "change"):
        out[c] = [_cell(v) for v in df[c]]
    out["tolerance"] = [("-" if pd.isna(v) else f"{v:.3g}") for v in df["tolerance"]]
    out["better"] = [_cell(v) for v in df["better"]]
    return out


def summary(df: pd.DataFrame, ref_dir: Path) -> str:
    bad = failures(df)
    compared = int((df["metric"] != "-").sum())
    if bad.empty:
        return f"check passed: {compared} metrics within tolerance of {ref_dir}"
    counts = bad["status"].value_counts()
    what = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
    return f"check FAILED against {ref_dir}: {what} (of {compared} metrics compared)"
