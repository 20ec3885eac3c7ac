"""Run specs: plain YAML validated into dataclasses, with presets and ``--set`` overrides.

Validation is strict and early: an unknown field, a wrong type, an unknown
baseline or task, or an impossible budget is a ``SpecError`` naming the field,
raised before anything is written. The parts: the dataclasses and what each field
means (``dictbench.spec_types``), the rules a spec must meet (``dictbench.spec_checks``),
and here the way YAML becomes a spec (typed construction, presets, files, overrides).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from dictbench.errors import SpecError, UserError
from dictbench.spec_checks import CACHE_DTYPES, SOURCES, validate
from dictbench.spec_types import (
    STREAM_ABOVE_BYTES,
    BaselineEntry,
    BudgetSpec,
    EvalSpec,
    RunSpec,
)

# Importers read every spec name from here; the dataclasses and rules live beside.
__all__ = [
    "CACHE_DTYPES",
    "DEFAULT_PRESET",
    "SOURCES",
    "STREAM_ABOVE_BYTES",
    "BaselineEntry",
    "BudgetSpec",
    "EvalSpec",
    "RunSpec",
    "apply_override",
    "build",
    "load_preset_dict",
    "merge",
    "on_preset",
    "preset_names",
    "read_spec_file",
    "replace_baselines",
    "resolve",
    "validate",
]

DEFAULT_PRESET = "quickstart"


# --- generic dataclass construction with type checks ----------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except SpecError as e:
                errors.append(str(e))
        raise SpecError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {type(value).__name__}")
        return build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{where}: expected a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise SpecError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 1e-3 without a dot as a string; accept it as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"{where}: expected a string, got {value!r}")
        return value
    raise SpecError(f"{where}: unsupported type {_type_name(tp)}")


def build(cls: type, data: dict[str, Any], where: str = "spec") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise SpecError(f"{where}.{key}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


# --- presets, files and overrides ------------------------------------------------------


def preset_names() -> list[str]:
    folder = resources.files("dictbench") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _spec_mapping(load: Callable[[], Any], origin: Any) -> dict[str, Any]:
    """A YAML document that must be a mapping: the loader's refusals (aliases,
    duplicate keys, empty or unreadable files) and any other shape become one-line
    SpecErrors naming ``origin``."""
    try:
        data = load()
    except UserError as e:
        raise SpecError(str(e)) from None
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: the spec must be a YAML mapping")
    return data


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    from dictbench.io import safe_yaml

    return _spec_mapping(lambda: safe_yaml.loads(text, origin), origin)


def read_spec_file(spec_path: str, flag: str = "spec") -> dict[str, Any]:
    """A spec file as a mapping. A missing, unreadable, non-UTF-8, empty or hostile
    file is a one-line SpecError that starts with ``flag`` (how the user named it)."""
    from dictbench.io import safe_yaml

    path = Path(spec_path)
    if not path.is_file():
        raise SpecError(f"{flag}: no such file '{spec_path}'")
    return _spec_mapping(lambda: safe_yaml.load_path(path), path)


def load_preset_dict(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise SpecError(f"preset: unknown preset '{name}' (known: {', '.join(preset_names())})")
    text = (resources.files("dictbench") / "presets" / f"{name}.yaml").read_text()
    return _read_yaml(text, f"preset {name}")


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid onto ``base``: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def on_preset(data: dict[str, Any], name: Any) -> dict[str, Any]:
    """``data`` laid over the preset ``name``, which it then names; None: ``data`` as is."""
    if name is None:
        return data
    if not isinstance(name, str):
        raise SpecError("spec.preset: expected a preset name")
    return {**merge(load_preset_dict(name), data), "preset": name}


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """``a.b.c=value``; the value is parsed as YAML (so numbers and lists work)."""
    if "=" not in assignment:
        raise SpecError(f"--set {assignment}: expected key=value")
    key, raw = assignment.split("=", 1)
    from dictbench.io import safe_yaml

    try:
        value = safe_yaml.loads(raw, f"--set {key}", allow_empty=True)
    except UserError as e:
        raise SpecError(f"--set {key}: value is not valid YAML ({e})") from None
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SpecError(f"--set {key}: no list item {part}")
            node = node[int(part)]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise SpecError(f"--set {key}: no list item {last}")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise SpecError(f"--set {key}: '{'.'.join(parts[:-1])}' is not a mapping")


def replace_baselines(data: dict[str, Any], refs: list[str] | None) -> None:
    """``--baseline REF`` (repeatable): these methods replace the spec's baselines. Done
    before ``--set`` is applied, so ``--set baselines.0.params.k=3`` edits them."""
    if refs:
        data["baselines"] = [{"method": ref} for ref in refs]


def resolve(
    spec_path: str | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    baselines: list[str] | None = None,
) -> RunSpec:
    """The validated spec of a file, a preset (the quickstart when neither is given),
    ``--baseline`` replacements and ``--set`` overrides, applied in that order."""
    data: dict[str, Any] = {}
    if spec_path is not None:
        data = read_spec_file(spec_path)
    base_name = preset or data.get("preset") or (None if spec_path else DEFAULT_PRESET)
    data = on_preset(data, base_name)
    replace_baselines(data, baselines)
    for ov in overrides or []:
        apply_override(data, ov)
    spec = build(RunSpec, data)
    validate(spec)
    return spec
