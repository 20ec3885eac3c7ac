"""Scoring tasks. Importing this package registers every built-in task."""

from dictbench.tasks import (  # noqa: F401
    autointerp,
    dead_latents,
    downstream,
    feature_recovery,
    reconstruction,
    shrinkage,
    sparsity,
)
from dictbench.tasks.base import Task, TaskEnv, TaskResult, TokenTask

__all__ = ["Task", "TaskEnv", "TaskResult", "TokenTask"]
