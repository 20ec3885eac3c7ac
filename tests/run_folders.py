"""Hand-built run folders for the leaderboard, check and plot tests.

Records go through ``dictbench.score.records.write_record`` (the real writer), with metric
values chosen by the test, so every expected number is known before the code runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dictbench.io import atomic
from dictbench.score.records import RecordTarget, write_record

CONTEXT: dict[str, Any] = {
    "run": "hand",
    "model": "embedded:smollm2-135m",
    "model_fingerprint": "0123456789abcdef",
    "hook": "resid_post.6",
    "corpus": {
        "name": "embedded:sotu",
        "subset": None,
        "split": "train",
        "text_field": "text",
        "data_files": [],
        "format": "text",
        "eval_fraction": 0.1,
    },
    "ctx_len": 128,
    "eval_cache": "feedfacefeedfacefeed",
    "eval_split_tokens": 65659,
    "seed": 0,
}
EVAL_TOKENS = {"downstream": 16380, "training": 499968}
DEFAULT_EVAL_TOKENS = 65659
TASK_OF = {
    "l0": "sparsity",
    "l1": "sparsity",
    "mse": "reconstruction",
    "fvu": "reconstruction",
    "explained_variance": "reconstruction",
    "cossim": "reconstruction",
    "relative_reconstruction_bias": "shrinkage",
    "l2_ratio": "shrinkage",
    "ce_clean": "downstream",
    "ce_zero": "downstream",
    "ce_sae": "downstream",
    "ce_loss_recovered": "downstream",
    "delta_ce": "downstream",
    "kl": "downstream",
    "frac_dead": "dead_latents",
    "frac_alive": "dead_latents",
    "window_tokens": "dead_latents",
    "wall_seconds": "training",
    "tokens": "training",
}


def make_sae(
    run_dir: Path,
    sae_id: str,
    baseline: str,
    metrics: dict[str, float | None],
    *,
    context: dict[str, Any] | None = None,
    eval_tokens: dict[str, int] | None = None,
    hist_counts: list[int] | None = None,
    n_dead: int = 0,
) -> None:
    """Write one record per task that ``metrics`` touches (plus a training record)."""
    ctx = {**CONTEXT, **(context or {})}
    by_task: dict[str, dict[str, float | None]] = {"training": {}}
    for name, value in metrics.items():
        by_task.setdefault(TASK_OF.get(name, "custom"), {})[name] = value
    by_task["training"].setdefault("tokens", 499968.0)
    if hist_counts is not None:
        by_task.setdefault("dead_latents", {}).setdefault("frac_dead", n_dead / 1000)
    tokens = {**EVAL_TOKENS, **(eval_tokens or {})}
    for task, ms in by_task.items():
        details: dict[str, Any] = {}
        if task == "dead_latents" and hist_counts is not None:
            edges = [-8.0 + 0.25 * i for i in range(len(hist_counts) + 1)]
            details["log10_density_hist"] = {
                "log10_density_bin_edges": edges,
                "counts": hist_counts,
                "n_dead": n_dead,
            }
        write_record(
            RecordTarget(run_dir, sae_id, baseline, ctx),
            task,
            {k: (float("nan") if v is None else v) for k, v in ms.items()},
            details,
            tokens.get(task, DEFAULT_EVAL_TOKENS),
        )


def make_failed_sae(run_dir: Path, sae_id: str, baseline: str, error: str) -> None:
    """What the runner writes when training fails: empty metrics, details.error."""
    write_record(
        RecordTarget(run_dir, sae_id, baseline, CONTEXT), "training", {}, {"error": error}, 0
    )


def write_run_json(run_dir: Path, **budget: Any) -> None:
    spec_budget = {"train_tokens": 500000, "batch_size": 256, "d_sae": 4608, **budget}
    atomic.write_json(
        run_dir / "run.json",
        {"status": "complete", "spec": {"name": run_dir.name, "budget": spec_budget}},
    )
