"""Scoring tasks. Importing this package registers every built-in task."""

from dictbench.tasks import (  # noqa: F401
    dead_latents,
    downstream,
    reconstruction,
    shrinkage,
    sparsity,
)
from dictbench.tasks.base import Task, TaskEnv, TaskResult, TokenTask

__all__ = ["Task", "TaskEnv", "TaskResult", "TokenTask"]
