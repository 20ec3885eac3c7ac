"""The task contract: score one SAE on held-out data and return flat metrics.

Most metrics are sums over evaluation tokens of something computed from
(x, f, x_hat). Those tasks are ``TokenTask``s: they hand the harness an
accumulator, and the harness feeds every token task from one encode/decode pass
per SAE instead of one pass per task.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from dictbench.score.metric_meta import Metric


@dataclass
class TaskResult:
    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    eval_tokens: int = 0


@dataclass
class TaskEnv:
    """What a task may look at. Activations are raw (unscaled) hook-point values.

    ``eval_acts`` is [n_seq, ctx, d_in] in sequence order, ``eval_token_ids`` the
    matching tokens, ``keep_positions`` the positions that count in averages
    (special positions such as BOS are excluded and keep their activation when
    spliced).
    """

    eval_acts: np.ndarray
    eval_token_ids: np.ndarray
    keep_positions: np.ndarray
    train_mean: np.ndarray
    hook: str = ""
    subject: Any = None
    seed: int = 0
    device: str = "cpu"
    batch_tokens: int = 8192
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Results that do not depend on the SAE (e.g. the clean and ablated CE losses), kept
    # so that a run scoring many SAEs computes them once; tasks own their keys.
    shared: dict[str, Any] = field(default_factory=dict)
    # The answer key of a synthetic run (dictbench.data.synthetic.GroundTruth): the true features
    # and the eval tokens' true coefficients. None for activations of a real model.
    ground_truth: Any = None

    def task_options(self, task: str) -> dict[str, Any]:
        return dict(self.options.get(task, {}))

    @property
    def n_eval_tokens(self) -> int:
        return int(self.eval_acts.shape[0] * int(self.keep_positions.sum()))

    def iter_tokens(self, max_tokens: int | None = None) -> Iterator[torch.Tensor]:
        """Non-special evaluation tokens as float32 [n, d_in] batches, in a fixed order."""
        keep = np.flatnonzero(self.keep_positions)
        per_seq = len(keep)
        n_seq = self.eval_acts.shape[0]
        if max_tokens is not None:
            n_seq = min(n_seq, max(1, -(-max_tokens // per_seq)))
        seqs_per_batch = max(1, self.batch_tokens // per_seq)
        for start in range(0, n_seq, seqs_per_batch):
            block = np.asarray(self.eval_acts[start : min(n_seq, start + seqs_per_batch)])
            x = torch.from_numpy(np.ascontiguousarray(block[:, keep].reshape(-1, block.shape[-1])))
            yield x.to(self.device, torch.float32)

    @torch.no_grad()
    def token_pass(
        self, sae: torch.nn.Module, accumulators: list[Any], max_tokens: int | None = None
    ) -> list[TaskResult]:
        for x in self.iter_tokens(max_tokens):
            f = sae.encode(x)
            x_hat = sae.decode(f)
            for acc in accumulators:
                acc.update(x, f, x_hat)
        return [acc.result() for acc in accumulators]


class TaskSkipped(Exception):
    """Raised by a task that cannot run in this setting (no judge configured, no
    subject model); the message is shown to the user in one line and the run goes on."""


class Task:
    """One scoring task. ``metrics`` declares every metric the task writes (direction,
    check tolerance, headline column): the records carry these declarations, so the
    leaderboard and ``dictbench check`` treat a new task's numbers right without a core
    edit. ``report_order`` places the task's headline columns among the others' (lower
    comes first; the built-in tasks use 10-80, training 1000)."""

    name: ClassVar[str] = ""
    needs_subject: ClassVar[bool] = False
    metrics: ClassVar[tuple[Metric, ...]] = ()
    report_order: ClassVar[int] = 100

    def run(self, sae: torch.nn.Module, env: TaskEnv) -> TaskResult:
        raise NotImplementedError


class TokenAccumulator:
    """Running float64 sums over tokens; ``result`` divides at the end."""

    def update(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self) -> TaskResult:
        raise NotImplementedError


class TokenTask(Task):
    def accumulator(self, sae: torch.nn.Module, env: TaskEnv) -> TokenAccumulator:
        raise NotImplementedError

    def max_tokens(self, env: TaskEnv) -> int | None:
        return env.task_options(self.name).get("max_tokens")

    def run(self, sae: torch.nn.Module, env: TaskEnv) -> TaskResult:
        return env.token_pass(sae, [self.accumulator(sae, env)], self.max_tokens(env))[0]
