"""The metrics of the ``training`` record, which no Task class writes: the trainer does.

Declared here, beside nothing heavy, so that the record writer, the leaderboard and
``dictbench check`` read them like any task's (``Task.metrics``).
"""

from __future__ import annotations

from dictbench.score.metric_meta import Metric

TRAINING_TASK = "training"
# After every task's headline columns (tasks use 10-100).
TRAINING_REPORT_ORDER = 1000

TRAINING_METRICS: tuple[Metric, ...] = (
    # Measures the machine, not the SAE: reported, never gated.
    Metric("wall_seconds", "lower", gate=False, headline=True),
    # Set by the budget: any change at all means a different run.
    Metric("tokens", "equal"),
    # FLOPs per token (a closed form of the shapes) times tokens: the same shapes and
    # budget give the same number exactly, so the check allows no change.
    Metric("flops_estimate", "equal"),
    Metric("train_frac_dead", "lower", abs_tol=0.01),
)
# Final training-loss terms (``final_<term>``) differ per method and are one batch's
# value, not an evaluation: reported, never gated.
IGNORED_PREFIXES = ("final_",)
