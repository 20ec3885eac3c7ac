"""One guarded YAML loader for every file a user hands us (specs, tolerances, overrides).

PyYAML's ``safe_load`` is safe against code execution but not against three hostile or
careless inputs: an alias bomb (a few lines of anchors that expand to billions of nodes and
hang the process), duplicate keys (silently last-one-wins, so a typo'd second ``budget:``
replaces the first), and an empty file (which loads as ``None`` and later surfaces as a
confusing "missing field" error). This loader refuses aliases outright - no spec needs
them - names the duplicate key and its line, and names an empty file as empty. Every error
is a one-line ``UserError``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dictbench.errors import UserError

MAX_BYTES = 16 * 1024 * 1024  # a spec or tolerance file is a few KB; refuse runaway inputs


class _GuardedLoader(yaml.SafeLoader):
    """SafeLoader that rejects aliases and duplicate mapping keys while composing."""

    def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: D401 - PyYAML hook
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(
                f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not "
                "allowed; write the value out in full"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise _Refused(
                    f"line {key_node.start_mark.line + 1}: YAML merge keys (<<) are not allowed"
                )
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise _Refused(
                    f"line {key_node.start_mark.line + 1}: a mapping key must be a plain value"
                ) from None
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _Refused(
                    f"line {line}: duplicate key '{key}' (first given on line {seen[key]})"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _Refused(Exception):
    """Internal: a structural refusal, turned into a UserError naming the origin."""


def loads(text: str, origin: str, *, allow_empty: bool = False) -> Any:
    """Parse one YAML document from ``text``; ``origin`` names it in errors (a path or flag).

    An empty document (nothing but whitespace and comments) is an error unless
    ``allow_empty``, in which case it returns ``None``.
    """
    if len(text) > MAX_BYTES:
        raise UserError(f"{origin}: file is too large for a YAML input ({len(text)} bytes)")
    if "\x00" in text:
        raise UserError(f"{origin}: not a text file (contains NUL bytes)")
    try:
        data = yaml.load(text, Loader=_GuardedLoader)  # noqa: S506 - SafeLoader subclass
    except _Refused as e:
        raise UserError(f"{origin}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{origin}: not valid YAML: {_one_line(e)}") from None
    except RecursionError:
        raise UserError(f"{origin}: YAML nested too deeply") from None
    if data is None and not allow_empty:
        raise UserError(f"{origin}: the file is empty (no YAML content)")
    return data


def load_path(path: str | Path, origin: str | None = None, *, allow_empty: bool = False) -> Any:
    """Read and parse a YAML file; unreadable or undecodable files are one-line errors."""
    p = Path(path)
    where = origin or str(p)
    try:
        size = p.stat().st_size
        if size > MAX_BYTES:
            raise UserError(f"{where}: file is too large for a YAML input ({size} bytes)")
        raw = p.read_bytes()
    except IsADirectoryError:
        raise UserError(f"{where}: is a folder, not a YAML file") from None
    except OSError as e:
        raise UserError(f"{where}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte offset {e.start})") from None
    return loads(text, where, allow_empty=allow_empty)


def _one_line(e: yaml.YAMLError) -> str:
    """PyYAML messages span several lines with a caret drawing; keep problem and position."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(e).split())
