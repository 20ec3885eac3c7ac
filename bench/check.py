"""Regression check of a run against a committed reference run.

Why direction-aware: a check that flags every change punishes improvements, so each
metric has a better direction (``leaderboard.DIRECTIONS``) and only a change the wrong
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
import yaml

from dictbench.errors import UserError
from dictbench.leaderboard import (
    AUTOINTERP_N_FAILED,
    AUTOINTERP_N_SCORED,
    AUTOINTERP_STDS,
    DIRECTIONS,
    Run,
    check_compatible,
    load_run,
    training_error,
)

DIRECTION_NAMES = ("higher", "lower", "target1", "equal")


@dataclass(frozen=True)
class Tolerance:
    direction: str  # higher | lower | target1 | equal
    abs: float = 0.0
    rel: float = 0.0
    ignore: bool = False

    def allowed(self, reference: float) -> float:
        return max(self.abs, self.rel * abs(reference))


def _tol(metric: str, abs_: float = 0.0, rel: float = 0.0) -> Tolerance:
    return Tolerance(DIRECTIONS[metric], abs_, rel)


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "l0": _tol("l0", 0.5, 0.02),
    "l1": _tol("l1", 0.0, 0.02),
    "mse": _tol("mse", 0.0, 0.02),
    "fvu": _tol("fvu", 0.005),
    "explained_variance": _tol("explained_variance", 0.005),
    "cossim": _tol("cossim", 0.005),
    "relative_reconstruction_bias": _tol("relative_reconstruction_bias", 0.005),
    "l2_ratio": _tol("l2_ratio", 0.005),
    "ce_clean": _tol("ce_clean", 1e-3),
    "ce_zero": _tol("ce_zero", 1e-3),
    "ce_mean": _tol("ce_mean", 1e-3),
    "ce_sae": _tol("ce_sae", 0.02, 0.005),
    "ce_loss_recovered": _tol("ce_loss_recovered", 0.005),
    "ce_loss_recovered_mean_ablation": _tol("ce_loss_recovered_mean_ablation", 0.01),
    "delta_ce": _tol("delta_ce", 0.02, 0.02),
    "kl": _tol("kl", 0.02, 0.02),
    "frac_dead": _tol("frac_dead", 0.01),
    "frac_alive": _tol("frac_alive", 0.01),
    "frac_dense": _tol("frac_dense", 0.01),
    "window_tokens": _tol("window_tokens"),
    "tokens": _tol("tokens"),
    "flops_estimate": _tol("flops_estimate", 0.0, 1e-9),
    "train_frac_dead": _tol("train_frac_dead", 0.01),
    # Synthetic feature recovery: the fraction moves in steps of 1/n_features (1/128 in the
    # preset), and a rounding-level change to the data has moved it by 3 features.
    "frac_recovered": _tol("frac_recovered", 0.03),
    "mmcs_true_to_learned": _tol("mmcs_true_to_learned", 0.02),
    "mmcs_learned_to_true": _tol("mmcs_learned_to_true", 0.02),
    "coef_corr": _tol("coef_corr", 0.02),
    "coef_corr_recovered": _tol("coef_corr_recovered", 0.02),
    "coef_shrinkage": _tol("coef_shrinkage", 0.02),
    "detection_recall": _tol("detection_recall", 0.02),
    "detection_precision": _tol("detection_precision", 0.02),
    # Autointerp scores depend on a judge model's sampling: a mean over ~100 latents moves
    # by a few hundredths between judges or prompt caches.
    "detection_balanced_accuracy": _tol("detection_balanced_accuracy", 0.05),
    "detection_accuracy": _tol("detection_accuracy", 0.05),
    "fuzzing_balanced_accuracy": _tol("fuzzing_balanced_accuracy", 0.05),
    "fuzzing_accuracy": _tol("fuzzing_accuracy", 0.05),
    "autointerp_n_latents": _tol("autointerp_n_latents"),
    # A latent or two more or less scored is the judge's flakiness, not the SAE's.
    **{m: _tol(m, 2.0) for m in AUTOINTERP_N_SCORED + AUTOINTERP_N_FAILED},
    # The spread over a sample of latents: reported, not a quality to gate on.
    **{m: Tolerance("equal", ignore=True) for m in AUTOINTERP_STDS},
    # Measures the machine, not the SAE.
    "wall_seconds": Tolerance("lower", ignore=True),
}
# Final training-loss terms differ per method and are a batch's value, not an evaluation.
IGNORED_PREFIXES = ("final_",)
# A metric dictbench does not know (a third-party task): any change beyond 2% fails,
# until a tolerance file says which way is better.
UNKNOWN = Tolerance("equal", 1e-9, 0.02)

_YAML_KEYS = {"direction", "abs", "rel", "ignore"}


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
    table = dict(DEFAULT_TOLERANCES if table is None else table)
    if path is None:
        return table
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UserError(f"--tolerances: cannot read '{path}' ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise UserError(f"--tolerances: '{path}' is not valid YAML ({e})") from e
    if doc is None:
        return table
    if not isinstance(doc, dict):
        raise UserError(f"--tolerances: '{path}' must map metric names to settings")
    for metric, entry in doc.items():
        where = f"{path}: {metric}"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected a mapping like {{abs: 0.01}}, got {entry!r}")
        base = tolerance_for(str(metric), table)
        table[str(metric)] = _merge(base, entry, where)
    return table


def apply_flags(
    table: dict[str, Tolerance],
    abs_tol: list[str] | None = None,
    rel_tol: list[str] | None = None,
    ignore: list[str] | None = None,
) -> dict[str, Tolerance]:
    """``--abs-tol METRIC=V``, ``--rel-tol METRIC=V`` and ``--ignore METRIC`` on top."""
    table = dict(table)
    for flag, key, items in (("--abs-tol", "abs", abs_tol), ("--rel-tol", "rel", rel_tol)):
        for item in items or []:
            metric, sep, value = item.partition("=")
            if not sep or not metric:
                raise UserError(f"{flag}: expected METRIC=VALUE, got '{item}'")
            try:
                v = float(value)
            except ValueError:
                raise UserError(f"{flag} {metric}: '{value}' is not a number") from None
            table[metric] = _merge(tolerance_for(metric, table), {key: v}, f"{flag} {metric}")
    for metric in ignore or []:
        table[metric] = replace(tolerance_for(metric, table), ignore=True)
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
    table = DEFAULT_TOLERANCES if tolerances is None else tolerances
    ref, run = load_run(Path(ref_dir), "reference"), load_run(Path(run_dir), "run")
    if not allow_mixed:
        check_compatible([ref, run])
    ref_recs, run_recs = _by_key(ref), _by_key(run)
    rows: list[dict[str, Any]] = []
    for sae, ref_tasks in ref_recs.items():
        run_tasks = run_recs.get(sae)
        if run_tasks is None:
            rows.append(_row(sae, "-", "-", "MISSING", run="SAE not in run"))
            continue
        ref_err = training_error(ref_tasks.get("training", {}))
        run_err = training_error(run_tasks.get("training", {}))
        if run_err is not None:
            status = "ok" if ref_err is not None else "FAILED"
            rows.append(_row(sae, "training", "-", status, reference=ref_err, run=run_err))
            continue
        if ref_err is not None:
            rows.append(_row(sae, "training", "-", "better", reference=ref_err, run="trained"))
        for task, ref_rec in ref_tasks.items():
            if training_error(ref_rec) is not None:
                continue
            run_rec = run_tasks.get(task)
            if run_rec is None:
                rows.append(_row(sae, task, "-", "MISSING", run="task record not in run"))
                continue
            for metric, ref_v in ref_rec["metrics"].items():
                tol = tolerance_for(metric, table)
                if tol.ignore:
                    continue
                if metric not in run_rec["metrics"]:
                    rows.append(_row(sae, task, metric, "MISSING", reference=ref_v, run="absent"))
                    continue
                new_v = run_rec["metrics"][metric]
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
    for sae in sorted(set(run_recs) - set(ref_recs)):
        rows.append(_row(sae, "-", "-", "new", reference="SAE not in reference"))
    return pd.DataFrame(rows, columns=COLUMNS)


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
