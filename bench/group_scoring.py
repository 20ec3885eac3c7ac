"""Scoring several SAEs of one task environment together.

Some tasks have an SAE-independent part that is too big to keep for a whole window but
cheap to share batch by batch: the downstream task's clean forward pass yields full
next-token distributions (tokens x vocabulary floats). Such a task offers
``run_many(saes, env) -> [TaskResult, ...]``, which runs that part once per batch for
all the SAEs handed to it; the task guarantees each result equals the SAE's alone.
This module finds those tasks (by that method, so no core file names a task), runs
them for a set of SAEs that are in memory together, writes their records, and leaves
every other task to ``runner.score_sae``, one SAE at a time, as before.

A record's ``wall_seconds`` for a shared task is the SAE's share: the group's time
divided by the number of SAEs in it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dictbench import faults
from dictbench.console import log
from dictbench.score.records import RecordTarget, write_record
from dictbench.score.scoring import score_sae
from dictbench.tasks.base import TaskEnv, TaskSkipped


@dataclass
class Member:
    """One SAE to score and what its records say about it."""

    module: torch.nn.Module
    sae_id: str
    method: str
    context: dict[str, Any]


def shares_passes(task: Any) -> bool:
    """Whether the task scores several SAEs at once (``run_many``)."""
    return callable(getattr(task, "run_many", None))


def parameter_bytes(module: torch.nn.Module) -> int:
    """Memory an SAE's weights take: what holding several at once costs."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def chunks(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive index groups whose sizes sum to at most ``budget`` (an SAE larger than
    the budget is a group of its own), so that one group's SAEs fit in memory together."""
    out: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if out and total + size <= budget:
            out[-1].append(i)
            total += size
        else:
            out.append([i])
            total = size
    return out


def score_members(
    members: list[Member],
    tasks: list[Any],
    env: TaskEnv,
    out: Path,
    task_context: dict[str, dict[str, Any]] | None = None,
) -> list[float]:
    """Score every member on every task and write the records; returns the seconds
    spent on each member (its own tasks plus its share of the shared ones)."""
    if not members:
        return []
    seconds = [0.0] * len(members)
    together = [task for task in tasks if shares_passes(task)]
    alone = [task for task in tasks if not shares_passes(task)]
    modules = [m.module for m in members]
    targets = [
        RecordTarget(out, m.sae_id, m.method, m.context, task_context or {}) for m in members
    ]
    for task in together:
        who = members[0].sae_id if len(members) == 1 else f"{len(members)} SAEs together"
        log(f"scoring {who}: {task.name} ...")
        t0 = time.perf_counter()
        try:
            results = task.run_many(modules, env)
        except TaskSkipped as e:
            for m in members:
                log(f"skipping task {task.name} for {m.sae_id}: {e}")
            continue
        share = (time.perf_counter() - t0) / len(members)
        for i, (m, res) in enumerate(zip(members, results, strict=True)):
            write_record(targets[i], task.name, res.metrics, res.details, res.eval_tokens, share)
            faults.point(f"record:{m.sae_id}/{task.name}")
            seconds[i] += share
    for i, m in enumerate(members):
        t0 = time.perf_counter()
        score_sae(m.module, targets[i], alone, env)
        seconds[i] += time.perf_counter() - t0
    return seconds
