"""How many latents fire per token, and how strongly."""

from __future__ import annotations

import torch

from dictbench.registry import register_task
from dictbench.score.metric_meta import Metric
from dictbench.tasks.base import TaskEnv, TaskResult, TokenAccumulator, TokenTask


class SparsityAccumulator(TokenAccumulator):
    """Sums stay in float64 so the mean over millions of tokens does not drift."""

    def __init__(self) -> None:
        self.n = 0
        self.l0_sum = torch.zeros((), dtype=torch.float64)
        self.l1_sum = torch.zeros((), dtype=torch.float64)

    def update(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> None:
        self.n += f.shape[0]
        self.l0_sum += (f != 0).sum(dtype=torch.float64).cpu()
        self.l1_sum += f.double().abs().sum().cpu()

    def result(self) -> TaskResult:
        n = torch.tensor(float(self.n), dtype=torch.float64)
        return TaskResult(
            metrics={"l0": (self.l0_sum / n).item(), "l1": (self.l1_sum / n).item()},
            eval_tokens=self.n,
        )


@register_task
class Sparsity(TokenTask):
    name = "sparsity"
    report_order = 10
    # Sparsity counts as lower-is-better: at equal fidelity a sparser code is the better one.
    metrics = (
        Metric("l0", "lower", abs_tol=0.5, rel_tol=0.02, headline=True),
        Metric("l1", "lower", rel_tol=0.02),
    )

    def accumulator(self, sae: torch.nn.Module, env: TaskEnv) -> TokenAccumulator:
        return SparsityAccumulator()
