"""How many latents fire per token, and how strongly."""

from __future__ import annotations

import torch

from dictbench.registry import register_task
from dictbench.score.indicators import nonzero_per_row
from dictbench.score.metric_meta import Metric
from dictbench.tasks.base import TaskEnv, TaskResult, TokenAccumulator, TokenTask


class SparsityAccumulator(TokenAccumulator):
    """Sums over tokens stay in float64 so the mean over millions of tokens does not drift.

    Each token's L1 is summed over its d_sae latents in float32 first (a cascade sum of a
    few thousand terms, relative error about 1e-7): converting the whole [tokens, d_sae]
    code to float64 cost more than the SAE's encoder. L0 is an exact integer count."""

    def __init__(self) -> None:
        self.n = 0
        self.l0_sum = torch.zeros((), dtype=torch.float64)
        self.l1_sum = torch.zeros((), dtype=torch.float64)

    def update(self, x: torch.Tensor, f: torch.Tensor, x_hat: torch.Tensor) -> None:
        self.n += f.shape[0]
        self.l0_sum += nonzero_per_row(f).sum().double().cpu()
        l1_per_token = torch.linalg.vector_norm(f, ord=1, dim=-1, dtype=torch.float32)
        self.l1_sum += l1_per_token.double().sum().cpu()

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
