"""Names of the built-in baselines, tasks and presets, found without importing them.

Why: importing a baseline or task module imports torch (2-6 s), and ``dictbench list``
only needs names. Each built-in module registers its class with ``@register_baseline``
or ``@register_task`` and a literal ``name = "..."``; reading that from the source with
``ast`` gives the same names the registry would. Where a decorated class's name is not a
literal string (so it cannot be read statically), the caller falls back to the registry,
so the answer is never wrong, only slower. Third-party baselines advertised as entry
points are listed by their entry-point name, which is what ``get_baseline`` resolves.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from importlib import resources
from importlib.metadata import entry_points
from pathlib import Path

_DECORATORS = {"baselines": "register_baseline", "tasks": "register_task"}


class NotStatic(Exception):
    """A registered class whose name cannot be read from the source."""


def _decorator_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _class_name_literal(cls: ast.ClassDef) -> str | None:
    for stmt in cls.body:
        if isinstance(stmt, ast.Assign):
            targets = [t.id for t in stmt.targets if isinstance(t, ast.Name)]
            value = stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            targets, value = [stmt.target.id], stmt.value
        else:
            continue
        if "name" in targets:
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                return value.value
            return None
    return None


def names_in_source(source: str, decorator: str, origin: str = "<source>") -> list[str]:
    """The ``name`` of every class decorated with ``decorator`` in one module's source."""
    out = []
    for node in ast.walk(ast.parse(source, filename=origin)):
        if not isinstance(node, ast.ClassDef):
            continue
        if any(_decorator_name(d) == decorator for d in node.decorator_list):
            name = _class_name_literal(node)
            if name is None:
                raise NotStatic(f"{origin}: class {node.name} has no literal name")
            out.append(name)
    return out


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # imports only the parent, `dictbench`
    if spec is None or not spec.submodule_search_locations:
        raise NotStatic(f"package {package} not found")
    return Path(next(iter(spec.submodule_search_locations)))


def _decorated_blocks(source: str, decorator: str, origin: str) -> str:
    """Only the top-level classes carrying ``decorator``, cut out of ``source``: parsing
    them instead of whole modules keeps ``list`` fast. A use of the decorator anywhere
    else (nested, or called as a function) cannot be cut out soundly: ``NotStatic``."""
    lines = source.splitlines()
    uses = len(re.findall(rf"\b{decorator}\b\s*(\(|$)", source, flags=re.M))
    imports = len(re.findall(rf"^\s*from\s+\S+\s+import\s+.*\b{decorator}\b", source, re.M))
    blocks, i = [], 0
    top = re.compile(rf"^@\s*[\w.]*\b{decorator}\b")
    while i < len(lines):
        if not top.match(lines[i]):
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("class "):
            j += 1
        j += 1
        while j < len(lines) and (not lines[j] or lines[j][0] in " \t#)"):
            j += 1
        blocks.append("\n".join(lines[i:j]))
        i = j
    if len(blocks) != uses - imports:
        raise NotStatic(f"{origin}: {decorator} is used where the source cannot be cut")
    return "\n\n".join(blocks)


def builtin_names(kind: str) -> list[str]:
    """Registered names in ``dictbench.<kind>`` (kind: baselines or tasks), from source."""
    decorator = _DECORATORS[kind]
    names: list[str] = []
    for path in sorted(_package_dir(f"dictbench.{kind}").glob("*.py")):
        source = path.read_text(encoding="utf-8")
        if decorator not in source:
            continue
        blocks = _decorated_blocks(source, decorator, str(path))
        names += names_in_source(blocks, decorator, str(path))
    return names


def entry_point_baseline_names() -> list[str]:
    return [ep.name for ep in entry_points(group="dictbench.baselines")]


def baseline_names() -> list[str]:
    try:
        builtin = builtin_names("baselines")
    except (NotStatic, OSError, SyntaxError):
        from dictbench import registry  # the slow, always-right answer

        return registry.baseline_names()
    return sorted(set(builtin) | set(entry_point_baseline_names()))


def task_names() -> list[str]:
    try:
        return sorted(set(builtin_names("tasks")))
    except (NotStatic, OSError, SyntaxError):
        from dictbench import registry

        return registry.task_names()


def preset_names() -> list[str]:
    folder = resources.files("dictbench") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
