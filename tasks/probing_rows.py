"""The rows of a `datasets` entry: open one split (the hub, a ``save_to_disk`` folder, a
folder of data files or ``data_files``; streamed or not), read each row's text and label,
and draw a seeded number of rows per class.

A streamed split is read in order until every wanted class has more rows than the draw
needs, which is how SAEBench reads europarl and github-code (the first rows of the
stream, not a sample of the whole split); the draw is then a seeded shuffle of those.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from dictbench.errors import UserError
from dictbench.tasks.probing_entries import OPT


@dataclass
class Pool:
    """Rows read from one split: text, class label and (``balance_by``) group value."""

    texts: list[str]
    labels: list[str]
    groups: list[str] | None


def wanted_classes(entry: dict[str, Any]) -> list[str] | None:
    """The classes an entry asks for, in its order; None: every label in the data."""
    if entry.get("classes"):
        return list(entry["classes"])
    if entry.get("class_sources"):
        return list(entry["class_sources"])
    return None


def read_pool(
    entry: dict[str, Any],
    split: str,
    classes: list[str] | None,
    need: int,
    cap: tuple[int, int] | None = None,
) -> Pool:
    """The split's rows (of each class source in turn). Streamed: until every class has
    more than ``need``; ``cap`` = (rows, seed): a seeded subsample of a larger split."""
    sources = entry.get("class_sources") or {None: {}}
    texts: list[str] = []
    labels: list[str] = []
    groups: list[str] = []
    for cls, src in sources.items():
        if cls is not None and classes is not None and cls not in classes:
            continue
        text_col = src.get("text_column") or entry["text_column"]
        try:
            ds = _open(entry, split, src.get("subset", entry.get("subset")))
            if entry.get("streaming"):
                want = [cls] if cls is not None else (classes or [])
                part = _read_stream(ds, entry, text_col, cls, want, need)
            else:
                part = _read_table(ds, entry, text_col, cls, cap)
        except UserError:
            raise
        except Exception as e:  # datasets raises many kinds (hub, file, config errors)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{OPT}.datasets: cannot load '{entry['name']}': {first}") from e
        texts += part.texts
        labels += part.labels
        groups += part.groups or []
    return Pool(texts, labels, groups if entry.get("balance_by") else None)


def _open(entry: dict[str, Any], split: str, subset: str | None) -> Any:
    import datasets

    datasets.disable_progress_bars()
    name, stream = entry["name"], bool(entry.get("streaming"))
    if entry.get("data_files"):
        files = sorted(sum((glob.glob(os.path.expanduser(p)) for p in entry["data_files"]), []))
        if not files:
            raise UserError(f"{OPT}.datasets: no file matches {entry['data_files']!r}")
        fmt = entry.get("format", "json")
        return datasets.load_dataset(fmt, data_files=files, split="train", streaming=stream)
    saved = ("dataset_info.json", "dataset_dict.json")
    if os.path.isdir(name) and any(os.path.exists(os.path.join(name, f)) for f in saved):
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(
                    f"{OPT}.datasets: '{name}' has no split '{split}' (splits: {', '.join(ds)})"
                )
            ds = ds[split]
        return ds.to_iterable_dataset() if stream else ds
    return datasets.load_dataset(name, subset, split=split, streaming=stream)


def _check_columns(entry: dict[str, Any], cols: list[str], text_col: str, fixed: Any) -> None:
    need = [text_col.split(".")[0]]
    need += [entry["label_column"]] if fixed is None else []
    need += [entry["balance_by"]] if entry.get("balance_by") else []
    for col in need:
        if col not in cols:
            raise UserError(
                f"{OPT}.datasets: '{entry['name']}' has no column '{col}' "
                f"(columns: {', '.join(cols)})"
            )


def _pick(value: Any, text_col: str, entry: dict[str, Any]) -> str:
    """The text of one row's column value: ``a.b`` reads key ``b`` of mapping column a."""
    for key in text_col.split(".")[1:]:
        if not isinstance(value, dict) or key not in value:
            raise UserError(
                f"{OPT}.datasets: '{entry['name']}' column '{text_col.split('.')[0]}' "
                f"has no field '{key}'"
            )
        value = value[key]
    return str(value)


def _kept(entry: dict[str, Any], text: str) -> str | None:
    """The text after the ``min_chars`` filter and the ``skip_chars`` cut (None: dropped)."""
    if len(text) < entry.get("min_chars", 0):
        return None
    return text[entry.get("skip_chars", 0) :]


def _read_table(ds: Any, entry: dict[str, Any], text_col: str, fixed: str | None, cap: Any) -> Pool:
    _check_columns(entry, list(ds.column_names), text_col, fixed)
    if cap is not None and len(ds) > cap[0]:
        ds = ds.shuffle(seed=cap[1]).select(range(cap[0]))
    raw = [_pick(v, text_col, entry) for v in ds[text_col.split(".")[0]]]
    if fixed is not None:
        labels = [fixed] * len(raw)
    else:
        labels = [str(v) for v in ds[entry["label_column"]]]
    groups = [str(v) for v in ds[entry["balance_by"]]] if entry.get("balance_by") else None
    texts = [_kept(entry, t) for t in raw]
    keep = [i for i, t in enumerate(texts) if t is not None]
    return Pool(
        [texts[i] for i in keep],  # type: ignore[misc]
        [labels[i] for i in keep],
        [groups[i] for i in keep] if groups is not None else None,
    )


def _read_stream(
    ds: Any, entry: dict[str, Any], text_col: str, fixed: str | None, want: list[str], need: int
) -> Pool:
    """Rows in stream order, of the wanted classes and past the text filters, until each
    wanted class has more than ``need`` of them (SAEBench's stopping rule)."""
    counts = dict.fromkeys(want, 0)
    texts: list[str] = []
    labels: list[str] = []
    for i, row in enumerate(ds):
        if i == 0:
            _check_columns(entry, list(row), text_col, fixed)
        label = fixed if fixed is not None else str(row[entry["label_column"]])
        if label in counts:
            text = _kept(entry, _pick(row[text_col.split(".")[0]], text_col, entry))
            if text is not None:
                texts.append(text)
                labels.append(label)
                counts[label] += 1
        if all(n > need for n in counts.values()):
            break
    return Pool(texts, labels, None)


def draw(
    entry: dict[str, Any],
    pool: Pool,
    split: str,
    classes: list[str],
    counts: list[int],
    seed: list[int],
) -> list[list[int]]:
    """Pool indices per side: ``counts[s]`` rows of each class for side s, split equally
    among the ``balance_by`` values of the class, from one seeded shuffle per class (and
    value). Too few rows is a UserError naming the class."""
    by_class: dict[str, list[int]] = {}
    for i, lab in enumerate(pool.labels):
        by_class.setdefault(lab, []).append(i)
    out: list[list[int]] = [[] for _ in counts]
    for ci, cls in enumerate(classes):
        members = by_class.get(cls, [])
        if not members:
            raise UserError(
                f"{OPT}.datasets: '{entry['label']}' has no row of class '{cls}' in split '{split}'"
            )
        buckets: dict[str, list[int]] = {}
        for i in members:
            buckets.setdefault(pool.groups[i] if pool.groups is not None else "", []).append(i)
        if pool.groups is not None and len(buckets) < 2:
            raise UserError(
                f"{OPT}.datasets: '{entry['label']}' class '{cls}' has one value of "
                f"'{entry['balance_by']}' in split '{split}' (balance_by needs two or more)"
            )
        for gi, (value, idx) in enumerate(sorted(buckets.items())):
            per = [k // len(buckets) for k in counts]
            if len(idx) < sum(per):
                what = f" with {entry['balance_by']}={value}" if pool.groups is not None else ""
                raise UserError(
                    f"{OPT}.datasets: '{entry['label']}' has {len(idx)} rows of class "
                    f"'{cls}'{what} in split '{split}' (needs {sum(per)})"
                )
            perm = np.random.default_rng([*seed, ci, gi]).permutation(len(idx))
            start = 0
            for side, k in enumerate(per):
                out[side].extend(idx[j] for j in perm[start : start + k])
                start += k
    return out
