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


def registered_baselines() -> dict[str, type]:
    """Name -> class of every baseline registered in this process (dictbench's own and
    those registered by import; entry points are not loaded)."""
    _load_builtins()
    return dict(sorted(_BASELINES.items()))


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


def _own(cls: type, method: str, base: type) -> bool:
    """Whether ``cls`` has ``method`` other than ``base``'s placeholder."""
    fn = getattr(cls, method, None)
    return callable(fn) and fn is not getattr(base, method, None)


def check_baseline_class(cls: Any, ref: str) -> type:
    """Fail early, naming what is missing, instead of deep inside training.

    Checks what the harness calls on every method: the class is an ``nn.Module`` with
    ``encode``, ``decode``, ``forward`` and ``loss``; ``config_class`` is a dataclass with
    ``d_in`` and ``d_sae``; and ``cls(config_class(d_in=..., d_sae=...))`` builds, keeps
    its config as ``.cfg`` and has a ``W_dec`` of shape [d_sae, d_in] (saved, exported
    and used for FLOPs). ``fold_input_scale`` is checked per budget (``missing_for_budget``).
    """
    if not inspect.isclass(cls):
        raise UserError(f"baseline '{ref}' is not a class")
    import torch

    if not issubclass(cls, torch.nn.Module):
        raise UserError(f"baseline '{ref}' must subclass torch.nn.Module")
    missing = [m for m in REQUIRED_METHODS if not callable(getattr(cls, m, None))]
    if "forward" not in missing and not _own(cls, "forward", torch.nn.Module):
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
    _check_instance(cls, ref)
    return cls


def _check_instance(cls: type, ref: str) -> None:
    """Build a tiny instance: what ``__init__`` sets is only visible on one."""
    d_in, d_sae = 4, 8
    try:
        sae = cls(cls.config_class(d_in=d_in, d_sae=d_sae))
    except Exception as e:  # noqa: BLE001 - the user's code: any failure is the answer
        raise UserError(
            f"baseline '{ref}': {cls.__name__}(config_class(d_in={d_in}, d_sae={d_sae})) "
            f"failed: {type(e).__name__}: {e}"
        ) from None
    if not hasattr(sae, "cfg"):
        raise UserError(f"baseline '{ref}': __init__ must keep its config as self.cfg")
    w_dec = getattr(sae, "W_dec", None)
    if w_dec is None or tuple(getattr(w_dec, "shape", ())) != (d_sae, d_in):
        raise UserError(
            f"baseline '{ref}' needs a W_dec tensor of shape [d_sae, d_in] (the decoder rows)"
        )


def missing_for_budget(cls: type, normalize_activations: bool) -> str | None:
    """What the budget makes the harness call that ``cls`` lacks, in words, or None.

    With ``budget.normalize_activations`` true the SAE trains on scaled inputs and the
    harness calls ``fold_input_scale(scale)`` before saving it."""
    if not normalize_activations:
        return None
    from dictbench.baselines.base import Baseline

    if callable(getattr(cls, "fold_input_scale", None)) and _own(cls, "fold_input_scale", Baseline):
        return None
    return (
        "has no fold_input_scale(scale), which budget.normalize_activations: true needs; "
        "add it, or set budget.normalize_activations: false"
    )


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


def task_class(name: str) -> type | None:
    """The registered task class of that name, or None (a record of a task this process
    does not know, such as a third-party one)."""
    _load_builtins()
    return _TASKS.get(name)


def get_task(name: str) -> type:
    _load_builtins()
    if name not in _TASKS:
        raise UserError(f"unknown task '{name}' (known: {', '.join(task_names())})")
    return _TASKS[name]
