"""Scoring one SAE of a run: the task environment, the context every record carries,
and one pass over the tasks that writes a record per task.

``dictbench run`` and ``dictbench eval`` both score through here, so an SAE evaluated
later under its run's spec gets exactly the records the run wrote.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dictbench import faults
from dictbench.console import log
from dictbench.data.subject import SubjectModel
from dictbench.score.records import RecordTarget, write_record
from dictbench.spec import RunSpec
from dictbench.tasks.base import TaskEnv, TaskSkipped, TokenTask


def build_env(
    spec: RunSpec, subject: SubjectModel | None, train_mean: Any, eval_store: Any
) -> TaskEnv:
    """The held-out data and settings every task sees, from a spec and its caches."""
    options = {k: dict(v) for k, v in spec.task_options.items()}
    options.setdefault("downstream", {}).setdefault("max_tokens", spec.eval.downstream_tokens)
    if spec.cache_dir:  # judge replies live beside the activations unless told otherwise
        options.setdefault("autointerp", {}).setdefault("cache_dir", f"{spec.cache_dir}/judge")
    return TaskEnv(
        eval_acts=eval_store.acts,
        eval_token_ids=eval_store.tokens,
        keep_positions=eval_store.keep,
        train_mean=train_mean,
        hook=spec.hook,
        subject=subject,
        seed=spec.seed,
        device=subject.device if subject is not None else "cpu",
        batch_tokens=spec.eval.batch_tokens,
        options=options,
        ground_truth=getattr(eval_store, "ground_truth", None),
    )


def record_context(spec: RunSpec, subject: SubjectModel | None, eval_store: Any) -> dict[str, Any]:
    """What every result record says about where it came from; the leaderboard refuses
    to compare records whose context differs."""
    if spec.synthetic is not None:  # the generator, not a model and corpus, made the data
        return {
            "run": spec.name,
            "model": "synthetic",
            "model_fingerprint": None,
            "hook": "synthetic",
            "corpus": spec.synthetic.identity(),
            "ctx_len": int(eval_store.acts.shape[1]),
            "eval_cache": eval_store.meta["fingerprint"],
            "eval_split_tokens": eval_store.n_tokens,
            "seed": spec.seed,
        }
    return {
        "run": spec.name,
        "model": spec.model.name,
        "model_fingerprint": subject.fingerprint() if subject is not None else None,
        "hook": spec.hook,
        "corpus": spec.corpus.identity(),
        "ctx_len": spec.corpus.ctx_len,
        "eval_cache": eval_store.meta["fingerprint"],
        "eval_split_tokens": eval_store.n_tokens,
        "seed": spec.seed,
    }


def score_sae(
    sae: torch.nn.Module, target: RecordTarget, tasks: list[Any], env: TaskEnv
) -> dict[str, Any]:
    """Run every task on one SAE and write one record per task (``target`` says where and
    what each carries). Token tasks that agree on their evaluation window share one
    encode/decode pass. A task that raises ``TaskSkipped`` is reported in one line and
    leaves no record."""
    sae_id = target.sae_id
    token_tasks = [task for task in tasks if isinstance(task, TokenTask)]
    other = [task for task in tasks if not isinstance(task, TokenTask)]
    by_window: dict[Any, list[Any]] = {}
    for task in token_tasks:
        by_window.setdefault(task.max_tokens(env), []).append(task)
    results = {}

    def record(name: str, res: Any, seconds: float) -> None:
        # Written as soon as the task is done, so an interrupted run keeps it (--resume).
        results[name] = res
        write_record(target, name, res.metrics, res.details, res.eval_tokens, seconds)
        faults.point(f"record:{sae_id}/{name}")

    for window, group in by_window.items():
        accs = [task.accumulator(sae, env) for task in group]
        t0 = time.perf_counter()
        outs = env.token_pass(sae, accs, window)
        shared = time.perf_counter() - t0  # one pass serves the group: each record has it
        for task, res in zip(group, outs, strict=True):
            record(task.name, res, shared)
    for task in other:
        log(f"scoring {sae_id}: {task.name} ...")
        t0 = time.perf_counter()
        try:
            res = task.run(sae, env)
        except TaskSkipped as e:
            log(f"skipping task {task.name} for {sae_id}: {e}")
            continue
        record(task.name, res, time.perf_counter() - t0)
    return results


@dataclass
class Scoring:
    """What scoring an SAE of this run needs: the tasks, their data, where records go."""

    tasks: list[Any]
    env: TaskEnv
    out: Path
    context: dict[str, Any]
    timings: dict[str, Any]
    task_context: dict[str, dict[str, Any]]


def sae_context(p: Any, spec: RunSpec, context: dict[str, Any]) -> dict[str, Any]:
    """The record context of one SAE: the run's, plus its own seed when the spec sweeps
    seeds (``sae_seed``; ``seed`` stays the data split's, which every SAE shares)."""
    return {**context, "sae_seed": p.seed} if spec.seeds else context
