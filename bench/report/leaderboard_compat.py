"""Refusal to mix: a metric is only comparable between records scored on the same subject
model, hook point, corpus split and number of evaluation tokens, and trained under the
same budget. ``check_compatible`` names the first field that differs."""

from __future__ import annotations

from typing import Any

from dictbench.errors import UserError
from dictbench.report.leaderboard_load import Run, training_error
from dictbench.score.training_metrics import TRAINING_TASK

# Budget fields that make two runs' SAEs comparable (the common training budget).
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
