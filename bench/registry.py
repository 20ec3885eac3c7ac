"""Name -> class registries for baselines and tasks (lm-evaluation-harness style).

Third-party baselines come in three ways: registered by import, named as
``module:Class``, or advertised through the ``dictbench.baselines`` entry point group.
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from typing import Any

from dictbench.errors import UserError

_BASELINES: dict[str, type] = {}
_TASKS: dict[str, type] = {}

REQUIRED_METHODS = ("encode", "decode", "forward", "loss")


def register_baseline(cls: type) -> type:
    _BASELINES[cls.name] = cls
    return cls


def register_task(cls: type) -> type:
    _TASKS[cls.name] = cls
    return cls


def _load_builtins() -> None:
    import dictbench.baselines  # noqa: F401
    import dictbench.tasks  # noqa: F401


def _entry_point_baselines() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group="dictbench.baselines")}


def baseline_names() -> list[str]:
    _load_builtins()
    return sorted(set(_BASELINES) | set(_entry_point_baselines()))


def task_names() -> list[str]:
    _load_builtins()
    return sorted(_TASKS)


def _import_object(ref: str) -> Any:
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UserError(f"cannot import module '{module_name}' for baseline '{ref}': {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"module '{module_name}' has no attribute '{attr}' (from '{ref}')")
        obj = getattr(obj, part)
    return obj


def check_baseline_class(cls: Any, ref: str) -> type:
    """Fail early, naming what is missing, instead of deep inside training."""
    if not inspect.isclass(cls):
        raise UserError(f"baseline '{ref}' is not a class")
    import torch

    if not issubclass(cls, torch.nn.Module):
        raise UserError(f"baseline '{ref}' must subclass torch.nn.Module")
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(cls, m, None))]
    if not missing:
        base_nn = torch.nn.Module
        if getattr(cls, "forward", None) is getattr(base_nn, "forward", None):
            missing.append("forward")
    if missing:
        raise UserError(f"baseline '{ref}' is missing required method(s): {', '.join(missing)}")
    if not hasattr(cls, "config_class"):
        raise UserError(
            f"baseline '{ref}' has no 'config_class' (a dataclass with d_in and d_sae fields)"
        )
    names = {f for f in getattr(cls.config_class, "__dataclass_fields__", {})}
    if not {"d_in", "d_sae"} <= names:
        raise UserError(f"baseline '{ref}': config_class must be a dataclass with d_in and d_sae")
    return cls


def get_baseline(ref: str) -> type:
    _load_builtins()
    if ":" in ref:
        return check_baseline_class(_import_object(ref), ref)
    if ref in _BASELINES:
        return _BASELINES[ref]
    eps = _entry_point_baselines()
    if ref in eps:
        return check_baseline_class(eps[ref].load(), ref)
    raise UserError(f"unknown baseline '{ref}' (known: {', '.join(baseline_names())})")


def get_task(name: str) -> type:
    _load_builtins()
    if name not in _TASKS:
        raise UserError(f"unknown task '{name}' (known: {', '.join(task_names())})")
    return _TASKS[name]
