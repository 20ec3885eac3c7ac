"""Scoring tasks, one file each. Importing this package registers every built-in task:
each module is imported, and a module registers its own task, so adding a task never
means editing this file."""

import importlib
import pkgutil

from dictbench.tasks.base import Task, TaskEnv, TaskResult, TokenTask

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["Task", "TaskEnv", "TaskResult", "TokenTask"]
