"""Latents that never fire waste capacity; latents that fire everywhere explain little.

Density is only meaningful with the window size: a latent with density 1e-6 looks
dead in a window of 100k tokens, so the window is reported and flagged when it is
shorter than 10 tokens per latent.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dictbench.registry import register_task
from dictbench.score.indicators import positive_per_column
from dictbench.score.metric_meta import Metric
from dictbench.tasks.base import TaskEnv, TaskResult, TokenAccumulator, TokenTask

DENSE_THRESHOLD = 0.1
BIN_EDGES = np.linspace(-8.0, 0.0, 33)  # steps of 0.25


class DeadLatentsAccumulator(TokenAccumulator):
    """Counts firings per latent; stops at ``max_tokens`` so a shared pass keeps the window."""

    def __init__(self, max_tokens: int | None = None) -> None:
        self.max_tokens = None if max_tokens is None else int(max_tokens)
        self.n = 0
        self.fire_counts: torch.Tensor | None = None

    def update(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> None:
        if self.max_tokens is not None:
            f = f[: max(0, self.max_tokens - self.n)]
        counts = positive_per_column(f).cpu()
        self.n += f.shape[0]
        self.fire_counts = counts if self.fire_counts is None else self.fire_counts + counts

    def result(self) -> TaskResult:
        counts = self.fire_counts if self.fire_counts is not None else torch.zeros(0)
        m = counts.numel()
        density = counts.double().numpy() / self.n if self.n else np.zeros(m)
        alive = density > 0
        frac_dead = float((~alive).mean()) if m else float("nan")
        frac_dense = float((density > DENSE_THRESHOLD).mean()) if m else float("nan")
        # Clip so alive latents rarer than 1e-8 land in the first bin instead of vanishing.
        log_density = np.clip(np.log10(density[alive]), BIN_EDGES[0], BIN_EDGES[-1])
        hist, _ = np.histogram(log_density, bins=BIN_EDGES)
        details: dict[str, Any] = {
            "window_tokens": self.n,
            "log10_density_hist": {
                "log10_density_bin_edges": BIN_EDGES.tolist(),
                "counts": hist.tolist(),
                "n_dead": int((~alive).sum()),
            },
        }
        if self.n < 10 * m:
            details["window_below_10m"] = True
        return TaskResult(
            metrics={
                "frac_dead": frac_dead,
                "frac_alive": 1.0 - frac_dead,
                "frac_dense": frac_dense,
                "window_tokens": float(self.n),
            },
            details=details,
            eval_tokens=self.n,
        )


@register_task
class DeadLatents(TokenTask):
    name = "dead_latents"
    report_order = 50
    metrics = (
        Metric("frac_dead", "lower", abs_tol=0.01, headline=True),
        Metric("frac_alive", "higher", abs_tol=0.01),
        Metric("frac_dense", "lower", abs_tol=0.01),
        Metric("window_tokens", "equal"),
    )

    def accumulator(self, sae: torch.nn.Module, env: TaskEnv) -> TokenAccumulator:
        return DeadLatentsAccumulator(self.max_tokens(env))
