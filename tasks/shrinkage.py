"""Whether the SAE systematically shrinks its reconstructions (L1 penalties do)."""

from __future__ import annotations

import torch

from dictbench.registry import register_task
from dictbench.score.metric_meta import Metric
from dictbench.tasks.base import TaskEnv, TaskResult, TokenAccumulator, TokenTask

EPS = 1e-12


class ShrinkageAccumulator(TokenAccumulator):
    """gamma is a ratio of sums, not a mean of ratios: it minimises E||x_hat/gamma - x||^2."""

    def __init__(self) -> None:
        self.n = 0
        self.hat_sq_sum = torch.zeros((), dtype=torch.float64)
        self.dot_sum = torch.zeros((), dtype=torch.float64)
        self.ratio_sum = torch.zeros((), dtype=torch.float64)

    def update(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> None:
        x = x.double()
        x_hat = x_hat.double()
        self.n += x.shape[0]
        flat_x, flat_hat = x.reshape(-1), x_hat.reshape(-1)
        self.hat_sq_sum += torch.dot(flat_hat, flat_hat).cpu()
        self.dot_sum += torch.dot(flat_x, flat_hat).cpu()
        ratio = x_hat.norm(dim=-1) / x.norm(dim=-1).clamp_min(EPS)
        self.ratio_sum += ratio.sum().cpu()

    def result(self) -> TaskResult:
        n = torch.tensor(float(self.n), dtype=torch.float64)
        return TaskResult(
            metrics={
                "relative_reconstruction_bias": (self.hat_sq_sum / self.dot_sum).item(),
                "l2_ratio": (self.ratio_sum / n).item(),
            },
            eval_tokens=self.n,
        )


@register_task
class Shrinkage(TokenTask):
    name = "shrinkage"
    report_order = 40
    # 1 means neither shrinkage nor inflation.
    metrics = (
        Metric("relative_reconstruction_bias", "target1", abs_tol=0.005, headline=True),
        Metric("l2_ratio", "target1", abs_tol=0.005),
    )

    def accumulator(self, sae: torch.nn.Module, env: TaskEnv) -> TokenAccumulator:
        return ShrinkageAccumulator()
