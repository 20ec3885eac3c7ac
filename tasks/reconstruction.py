"""Reconstruction error, normalised by the variance of the same tokens.

FVU divides by the centred variance E||x - mu||^2: dividing by E||x||^2 (as
SAEBench's explained_variance does) flatters SAEs on activations with a large
mean, which residual streams have.
"""

from __future__ import annotations

import torch

from dictbench.registry import register_task
from dictbench.score.metric_meta import Metric
from dictbench.tasks.base import TaskEnv, TaskResult, TokenAccumulator, TokenTask

EPS = 1e-12


class ReconstructionAccumulator(TokenAccumulator):
    """Per-dimension sums of x and x^2 give the centred variance in one pass."""

    def __init__(self) -> None:
        self.n = 0
        self.sq_err_sum = torch.zeros((), dtype=torch.float64)
        self.cos_sum = torch.zeros((), dtype=torch.float64)
        self.x_sum: torch.Tensor | None = None
        self.x_sq_sum: torch.Tensor | None = None

    def update(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> None:
        x = x.double()
        x_hat = x_hat.double()
        self.n += x.shape[0]
        # dot products (BLAS) instead of elementwise products: fewer [n, d] temporaries
        err = (x - x_hat).reshape(-1)
        self.sq_err_sum += torch.dot(err, err).cpu()
        dot = torch.einsum("nd,nd->n", x, x_hat)
        norms = x.norm(dim=-1) * x_hat.norm(dim=-1)
        self.cos_sum += (dot / norms.clamp_min(EPS)).sum().cpu()
        x_sum, x_sq_sum = x.sum(0).cpu(), x.pow(2).sum(0).cpu()
        if self.x_sum is None or self.x_sq_sum is None:
            self.x_sum, self.x_sq_sum = x_sum, x_sq_sum
        else:
            self.x_sum += x_sum
            self.x_sq_sum += x_sq_sum

    def result(self) -> TaskResult:
        n = torch.tensor(float(self.n), dtype=torch.float64)
        if self.x_sum is None or self.x_sq_sum is None:
            total_var = torch.zeros((), dtype=torch.float64)
        else:
            mu = self.x_sum / n
            # Clamp per dimension: rounding can make a constant dimension slightly negative.
            total_var = (self.x_sq_sum - n * mu.pow(2)).clamp_min(0).sum()
        fvu = (self.sq_err_sum / total_var).item()
        return TaskResult(
            metrics={
                "mse": (self.sq_err_sum / n).item(),
                "fvu": fvu,
                "explained_variance": 1.0 - fvu,
                "cossim": (self.cos_sum / n).item(),
            },
            eval_tokens=self.n,
        )


@register_task
class Reconstruction(TokenTask):
    name = "reconstruction"
    report_order = 20
    metrics = (
        Metric("mse", "lower", rel_tol=0.02),
        Metric("fvu", "lower", abs_tol=0.005),
        Metric("explained_variance", "higher", abs_tol=0.005, headline=True),
        Metric("cossim", "higher", abs_tol=0.005, headline=True),
    )

    def accumulator(self, sae: torch.nn.Module, env: TaskEnv) -> TokenAccumulator:
        return ReconstructionAccumulator()
