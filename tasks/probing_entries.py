"""The ``task_options.sparse_probing.datasets`` option: names (sotu tasks, presets, preset
groups) and mappings resolved into checked entries, each bad field refused in one line.

An entry's fields (docs/tasks/sparse-probing.md has the table): ``name``,
``text_column`` (``a.b`` reads key ``b`` of a mapping column ``a``), ``label_column``,
``split``, ``test_split``, ``subset``, ``data_files`` with ``format``, ``classes``,
``class_sources``, ``train_per_class`` / ``test_per_class``, ``balance_by``,
``streaming``, ``min_chars``, ``skip_chars``, ``max_examples``, ``top_classes``,
``preset`` and ``label``.
"""

from __future__ import annotations

from typing import Any

from dictbench.errors import UserError
from dictbench.tasks.probing_presets import GROUPS, PRESETS, preset_name

OPT = "task_options.sparse_probing"
SOTU_TASKS = ("sotu_party", "sotu_era", "sotu_century", "sotu_delivery")
_STRINGS = (
    "name",
    "text_column",
    "label_column",
    "split",
    "test_split",
    "subset",
    "format",
    "balance_by",
    "label",
)
_INTS = {
    "max_examples": 1,
    "top_classes": 1,
    "train_per_class": 1,
    "test_per_class": 1,
    "min_chars": 0,
    "skip_chars": 0,
}
DATASET_KEYS = {*_STRINGS, *_INTS, "data_files", "classes", "class_sources", "streaming"}


def _known() -> str:
    return ", ".join([*SOTU_TASKS, "sotu", *GROUPS, *PRESETS])


def resolve_entry(entry: Any) -> dict[str, Any]:
    """One `datasets` entry as a checked dict: a sotu task or preset name (a preset's own
    or SAEBench's), or a mapping of fields, which may start from ``preset: NAME``."""
    if isinstance(entry, str):
        if entry in SOTU_TASKS:
            return {"name": entry, "label": entry}
        key = preset_name(entry)
        if key is None:
            raise UserError(f"{OPT}.datasets: unknown dataset '{entry}' (known: {_known()})")
        return check_entry({**PRESETS[key], "label": key})
    if not isinstance(entry, dict):
        raise UserError(f"{OPT}.datasets: each entry is a name or a mapping, got {entry!r}")
    if "preset" in entry:
        rest = {k: v for k, v in entry.items() if k != "preset"}
        key = preset_name(entry["preset"]) if isinstance(entry["preset"], str) else None
        if key is None:
            raise UserError(
                f"{OPT}.datasets: unknown preset {entry['preset']!r} (known: {', '.join(PRESETS)})"
            )
        return check_entry({**PRESETS[key], "label": key, **rest})
    return check_entry({"label": entry.get("name"), **entry})


def expand_entries(entries: Any) -> list[dict[str, Any]]:
    """The `datasets` list with `sotu` and the preset groups (`saebench`, ...) expanded."""
    if entries is None:
        entries = ["sotu"]
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{OPT}.datasets: a non-empty list of names or mappings")
    out: list[dict[str, Any]] = []
    for e in entries:
        if e == "sotu":
            out.extend(resolve_entry(t) for t in SOTU_TASKS)
        elif isinstance(e, str) and e in GROUPS:
            out.extend(resolve_entry(t) for t in GROUPS[e])
        else:
            out.append(resolve_entry(e))
    return out


def check_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """The entry with its defaults (``split: train``), or UserError naming the field."""
    unknown = sorted(set(entry) - DATASET_KEYS)
    if unknown:
        raise UserError(f"{OPT}.datasets: unknown field '{unknown[0]}' in {entry!r}")
    if not isinstance(entry.get("name"), str) or not entry["name"]:
        raise UserError(f"{OPT}.datasets: entry {entry!r} needs a 'name' string")
    entry = {"split": "train", **entry}
    where = f"{OPT}.datasets: entry '{entry.get('label') or entry['name']}'"

    def bad(msg: str) -> UserError:
        return UserError(f"{where}: {msg}")

    for key in _STRINGS:
        if key in entry and (not isinstance(entry[key], str) or not entry[key]):
            raise bad(f"'{key}' is a non-empty string, got {entry[key]!r}")
    for key, low in _INTS.items():
        v = entry.get(key)
        if key in entry and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise bad(f"'{key}' is an integer >= {low}, got {v!r}")
    if not isinstance(entry.get("streaming", False), bool):
        raise bad(f"'streaming' is true or false, got {entry['streaming']!r}")
    if "data_files" in entry:
        entry["data_files"] = _string_list(entry["data_files"], "data_files", bad)
    if "classes" in entry:
        entry["classes"] = _string_list(entry["classes"], "classes", bad, labels=True)
    _check_sources(entry, bad)
    _check_sampling(entry, bad)
    return entry


def _string_list(value: Any, key: str, bad: Any, labels: bool = False) -> list[str]:
    """A non-empty list of distinct strings (label values may be written as integers)."""
    if isinstance(value, str) and not labels:
        value = [value]
    ok = (str, int) if labels else (str,)
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, ok) and not isinstance(v, bool) for v in value)
    ):
        raise bad(f"'{key}' is a non-empty list of {'labels' if labels else 'strings'}")
    out = [str(v) for v in value]
    if len(set(out)) != len(out):
        raise bad(f"'{key}' lists a value twice: {value!r}")
    return out


def _check_sources(entry: dict[str, Any], bad: Any) -> None:
    """``class_sources`` (one subset per class, instead of a label column) or a
    ``label_column``, exactly one of them."""
    sources = entry.get("class_sources")
    if sources is None:
        for key in ("text_column", "label_column"):
            if not isinstance(entry.get(key), str):
                raise bad(f"needs a '{key}' string (or 'class_sources')")
        return
    if "label_column" in entry:
        raise bad("'class_sources' gives each class, so it takes no 'label_column'")
    if not isinstance(sources, dict) or not sources:
        raise bad("'class_sources' maps each class to {subset, text_column}")
    for cls, src in sources.items():
        if not isinstance(src, dict) or not src or set(src) - {"subset", "text_column"}:
            raise bad(f"'class_sources' of class '{cls}': a mapping of subset, text_column")
        if not all(isinstance(v, str) and v for v in src.values()):
            raise bad(f"'class_sources' of class '{cls}': names are non-empty strings")
        if "text_column" not in src and "text_column" not in entry:
            raise bad(f"'class_sources' of class '{cls}' needs a 'text_column'")
    entry["class_sources"] = {str(k): v for k, v in sources.items()}
    extra = sorted(set(entry.get("classes", [])) - set(entry["class_sources"]))
    if extra:
        raise bad(f"class '{extra[0]}' is in 'classes' but has no 'class_sources' entry")


def _check_sampling(entry: dict[str, Any], bad: Any) -> None:
    """How examples are drawn: per class (``train_per_class`` and ``test_per_class``,
    optionally ``balance_by`` and ``streaming``) or capped (``max_examples``)."""
    per_class = [k for k in ("train_per_class", "test_per_class") if k in entry]
    if len(per_class) == 1:
        raise bad("'train_per_class' and 'test_per_class' go together")
    if per_class and ("max_examples" in entry or "top_classes" in entry):
        raise bad("draws per class ('train_per_class') or capped ('max_examples', "
                  "'top_classes'), not both")  # fmt: skip
    for key in ("balance_by", "streaming"):
        if entry.get(key) and not per_class:
            raise bad(f"'{key}' needs 'train_per_class' and 'test_per_class'")
    if entry.get("streaming"):
        if "balance_by" in entry:
            raise bad("'streaming' and 'balance_by' cannot be combined")
        if "classes" not in entry and "class_sources" not in entry:
            raise bad("'streaming' needs 'classes' (it reads until each class is full)")
    if "test_split" in entry:
        if entry["test_split"] == entry["split"]:
            raise bad("'test_split' must differ from 'split'")
        if "data_files" in entry:
            raise bad("'data_files' is one split; 'test_split' needs a dataset with splits")
