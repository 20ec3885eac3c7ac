"""SAEBench's probing datasets as presets (tasks/probing_presets.py): their facts against
a table copied by hand from SAEBench's source, the `datasets` plumbing on a local copy of
each (written here with the preset's columns and label values, since the hub is out of
reach), and the new entry fields' checks."""

from __future__ import annotations

import ast
import json
from collections import Counter
from pathlib import Path

import pytest

from dictbench.errors import UserError
from dictbench.tasks import probing_data as pdata
from dictbench.tasks.sparse_probing import ProbingTexts, SparseProbing, options_with_defaults
from tests.test_sparse_probing import ReluSAE, _env

ROOT = Path(__file__).resolve().parents[1]

# By hand from SAEBench 0.6 (inside the sae_bench package): sae_bench_utils/dataset_info.py
# (chosen_classes_per_dataset; dataset_metadata's text, column1 and column2 names),
# sae_bench_utils/dataset_utils.py (the get_*_dataset loaders: hub name, splits, per-class
# sizes, europarl's language_pairs, github-code's character filter) and
# evals/sparse_probing/eval_config.py (dataset_names, 4000 train / 1000 test per task).
SAEBENCH = {
    "LabHC/bias_in_bios_class_set1": ("LabHC/bias_in_bios", ["0", "1", "2", "6", "9"]),
    "LabHC/bias_in_bios_class_set2": ("LabHC/bias_in_bios", ["11", "13", "14", "18", "19"]),
    "LabHC/bias_in_bios_class_set3": ("LabHC/bias_in_bios", ["20", "21", "22", "25", "26"]),
    "canrager/amazon_reviews_mcauley_1and5": (
        "canrager/amazon_reviews_mcauley_1and5",
        ["1", "2", "3", "5", "6"],
    ),
    "canrager/amazon_reviews_mcauley_1and5_sentiment": (
        "canrager/amazon_reviews_mcauley_1and5",
        ["1.0", "5.0"],
    ),
    "codeparrot/github-code": ("codeparrot/github-code", ["C", "Python", "HTML", "Java", "PHP"]),
    "fancyzhx/ag_news": ("fancyzhx/ag_news", ["0", "1", "2", "3"]),
    "Helsinki-NLP/europarl": ("Helsinki-NLP/europarl", ["en", "fr", "de", "es", "nl"]),
}
COLUMNS = {  # SAEBench name -> (text column, label column, balancing column)
    "LabHC/bias_in_bios_class_set1": ("hard_text", "profession", "gender"),
    "LabHC/bias_in_bios_class_set2": ("hard_text", "profession", "gender"),
    "LabHC/bias_in_bios_class_set3": ("hard_text", "profession", "gender"),
    "canrager/amazon_reviews_mcauley_1and5": ("text", "category", "rating"),
    "canrager/amazon_reviews_mcauley_1and5_sentiment": ("text", "rating", None),
    "codeparrot/github-code": ("code", "language", None),
    "fancyzhx/ag_news": ("text", "label", None),
}
HUB_TEST_SPLIT = {  # loaded dataset["train"] and dataset["test"]; the others stream train
    "LabHC/bias_in_bios_class_set1",
    "LabHC/bias_in_bios_class_set2",
    "LabHC/bias_in_bios_class_set3",
    "canrager/amazon_reviews_mcauley_1and5",
    "canrager/amazon_reviews_mcauley_1and5_sentiment",
    "fancyzhx/ag_news",
}
EUROPARL_PAIRS = {"en": "en-fr", "fr": "fr-it", "de": "de-en", "es": "es-fr", "nl": "nl-pt"}
GITHUB_SKIP_CHARS = 50 * 3  # tokens_to_skip * chars_per_token
GITHUB_MIN_CHARS = 128 * 3 + 50 * 3 + 1  # kept when len(code) > ctx_len_chars + skip
PER_CLASS = (4000 // 2, 1000 // 2)
PRESET_OF = {
    "LabHC/bias_in_bios_class_set1": "bias_in_bios_class_set1",
    "LabHC/bias_in_bios_class_set2": "bias_in_bios_class_set2",
    "LabHC/bias_in_bios_class_set3": "bias_in_bios_class_set3",
    "canrager/amazon_reviews_mcauley_1and5": "amazon_reviews_category",
    "canrager/amazon_reviews_mcauley_1and5_sentiment": "amazon_reviews_sentiment",
    "codeparrot/github-code": "github_code",
    "fancyzhx/ag_news": "ag_news",
    "Helsinki-NLP/europarl": "europarl",
}


@pytest.mark.parametrize("saebench_name", list(SAEBENCH))
def test_preset_facts_match_saebench(saebench_name):
    hub, classes = SAEBENCH[saebench_name]
    entry = pdata.resolve_entry(PRESET_OF[saebench_name])
    assert pdata.resolve_entry(saebench_name) == entry  # SAEBench's own name works too
    assert entry["name"] == hub and entry["split"] == "train"
    assert (entry["train_per_class"], entry["test_per_class"]) == PER_CLASS
    if saebench_name == "Helsinki-NLP/europarl":
        assert entry["class_sources"] == {
            lang: {"subset": pair, "text_column": f"translation.{lang}"}
            for lang, pair in EUROPARL_PAIRS.items()
        }
        assert "classes" not in entry and "label_column" not in entry
    else:
        text, label, balance = COLUMNS[saebench_name]
        assert entry["classes"] == classes
        assert (entry["text_column"], entry["label_column"]) == (text, label)
        assert entry.get("balance_by") == balance
    assert entry.get("test_split") == ("test" if saebench_name in HUB_TEST_SPLIT else None)
    assert entry.get("streaming", False) == (saebench_name not in HUB_TEST_SPLIT)
    github = saebench_name == "codeparrot/github-code"
    assert entry.get("min_chars") == (GITHUB_MIN_CHARS if github else None)
    assert entry.get("skip_chars") == (GITHUB_SKIP_CHARS if github else None)


def test_saebench_default_list_and_groups():
    want = [PRESET_OF[n] for n in SAEBENCH]  # eval_config.py's order
    assert [e["label"] for e in pdata.expand_entries(["saebench"])] == want
    assert pdata.expand_entries(list(SAEBENCH)) == pdata.expand_entries(["saebench"])
    sets = [e["label"] for e in pdata.expand_entries(["bias_in_bios_profession"])]
    assert sets == [f"bias_in_bios_class_set{i}" for i in (1, 2, 3)]
    assert set(pdata.PRESETS) == {*PRESET_OF.values(), "bias_in_bios_gender"}
    gender = pdata.resolve_entry("bias_in_bios_gender")  # dictbench's own (gender_dict)
    assert (gender["label_column"], gender["classes"]) == ("gender", ["0", "1"])


def _saebench_source() -> Path | None:
    found = sorted((ROOT / ".venv-saebench").glob("lib/python*/site-packages/sae_bench"))
    return found[0] if found else None


def _node(path: Path, name: str) -> ast.expr:
    """The expression assigned to ``name`` in a file: a plain assignment, or the default
    (or default_factory lambda's body) of a pydantic ``Field``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(
            getattr(t, "id", None) == name for t in node.targets
        ):
            return node.value
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name:
            assert isinstance(node.value, ast.Call)
            kw = {k.arg: k.value for k in node.value.keywords}
            factory = kw.get("default_factory")
            return kw["default"] if "default" in kw else factory.body  # type: ignore[union-attr]
    raise AssertionError(f"{name} is not assigned in {path}")


def _literal(path: Path, name: str):
    return ast.literal_eval(_node(path, name))


def _metadata_columns(path: Path) -> dict[str, tuple[str, str, str]]:
    """dataset_metadata's (text, column1, column2) names per dataset (its other values
    name dicts, so the whole is not a literal)."""
    meta = _node(path, "dataset_metadata")
    assert isinstance(meta, ast.Dict)
    out = {}
    for key, value in zip(meta.keys, meta.values, strict=True):
        assert isinstance(key, ast.Constant) and isinstance(value, ast.Dict)
        fields = {
            k.value: v.value
            for k, v in zip(value.keys, value.values, strict=True)
            if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)
        }
        names = ("text_column_name", "column1_name", "column2_name")
        out[key.value] = tuple(fields[n] for n in names)
    return out


@pytest.mark.skipif(
    _saebench_source() is None,
    reason="SAEBench's source is not installed beside dictbench (.venv-saebench)",
)
def test_hand_table_matches_the_installed_saebench_source():
    """SAEBench's files read as text (another venv's package cannot be imported here)
    and compared with the hand-written table above."""
    src = _saebench_source()
    assert src is not None
    info = src / "sae_bench_utils" / "dataset_info.py"
    utils = src / "sae_bench_utils" / "dataset_utils.py"
    config = src / "evals" / "sparse_probing" / "eval_config.py"
    assert _literal(info, "chosen_classes_per_dataset") == {k: v[1] for k, v in SAEBENCH.items()}
    assert _literal(config, "dataset_names") == list(SAEBENCH)
    sizes = (_literal(config, "probe_train_set_size"), _literal(config, "probe_test_set_size"))
    assert (sizes[0] // 2, sizes[1] // 2) == PER_CLASS
    assert _literal(utils, "language_pairs") == EUROPARL_PAIRS
    skip, ctx, per = (_literal(utils, n) for n in ("tokens_to_skip", "ctx_len", "chars_per_token"))
    assert (skip * per, ctx * per + skip * per + 1) == (GITHUB_SKIP_CHARS, GITHUB_MIN_CHARS)
    cols = _metadata_columns(info)
    assert cols["LabHC/bias_in_bios"] == COLUMNS["LabHC/bias_in_bios_class_set1"]
    amazon = "canrager/amazon_reviews_mcauley_1and5"
    assert cols[amazon] == COLUMNS[amazon]


# --- the plumbing on local copies -------------------------------------------------------


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """`datasets` builds its arrow cache under tmp_path, not the home folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _load(preset: str, folder: Path, **override) -> pdata.LabelledTexts:
    entry = pdata.resolve_entry({"preset": preset, "name": str(folder), **override})
    return pdata.load_entry(entry, seed=0)


def _picked(data: pdata.LabelledTexts) -> list[tuple[str, ...]]:
    """(side, *fields of the text) per example; the texts are "split:f1:f2:..."."""
    out = []
    for text, label, is_test in zip(data.texts, data.labels, data.is_test or [], strict=True):
        split, *fields = text.split(":")
        assert split == ("test" if is_test else "train")  # the row's own split
        out.append((split, label, *fields))
    return out


def _bios_folder(tmp_path: Path, classes: list[str]) -> Path:
    """LabHC/bias_in_bios's columns (hard_text, int profession, int gender; a decoy
    `text`): per chosen profession exactly 1000 train / 250 test bios of each gender, 300
    more male train bios, and profession 3 (chiropractor, in no set) beside them."""
    folder = tmp_path / "bias_in_bios"
    for split, n, extra_male in (("train", 1000, 300), ("test", 250, 0)):
        rows = [
            {"hard_text": f"{split}:{gender}:{i}", "profession": int(p), "gender": gender,
             "text": "decoy"}
            for p in [*classes, "3"]
            for gender in (0, 1)
            for i in range(n + (extra_male if gender == 0 else 0))
        ]  # fmt: skip
        _jsonl(folder / f"{split}.jsonl", rows)
    return folder


@pytest.mark.parametrize("set_no", [1, 2, 3])
def test_bias_in_bios_class_set_selects_its_professions_by_gender(tmp_path, set_no):
    classes = SAEBENCH[f"LabHC/bias_in_bios_class_set{set_no}"][1]
    data = _load(f"bias_in_bios_class_set{set_no}", _bios_folder(tmp_path, classes))
    picked = _picked(data)
    counts = Counter((side, prof, gender) for side, prof, gender, _ in picked)
    assert counts == {
        (side, p, g): n for side, n in (("train", 1000), ("test", 250)) for p in classes
        for g in ("0", "1")
    }  # fmt: skip
    # Where a quadrant holds exactly what is drawn, every row of it is taken.
    female_train = {(p, int(i)) for side, p, g, i in picked if side == "train" and g == "1"}
    assert female_train == {(p, i) for p in classes for i in range(1000)}
    assert len(set(picked)) == len(picked)  # no row twice


def test_bias_in_bios_gender_preset(tmp_path):
    data = _load("bias_in_bios_gender", _bios_folder(tmp_path, ["0", "1", "2", "6", "9"]))
    counts = Counter((side, label) for side, label, *_ in _picked(data))
    assert counts == {("train", "0"): 2000, ("train", "1"): 2000, ("test", "0"): 500,
                      ("test", "1"): 500}  # fmt: skip


def _amazon_rows(split: str, per: dict[tuple[int, float], int]) -> list[dict]:
    return [
        {"text": f"{split}:{cat}:{rating}:{i}", "category": cat, "rating": rating,
         "title": "decoy"}
        for (cat, rating), n in per.items()
        for i in range(n)
    ]  # fmt: skip


def test_amazon_category_selects_five_categories_by_rating(tmp_path):
    folder = tmp_path / "amazon"
    for split, n, extra in (("train", 1000, 200), ("test", 250, 0)):
        per = {(c, r): n + (extra if r == 5.0 else 0) for c in (0, 1, 2, 3, 4, 5, 6)
               for r in (1.0, 5.0)}  # fmt: skip
        _jsonl(folder / f"{split}.jsonl", _amazon_rows(split, per))
    picked = _picked(_load("amazon_reviews_category", folder))
    counts = Counter((side, cat, rating) for side, _, cat, rating, _ in picked)
    assert counts == {
        (side, c, r): n for side, n in (("train", 1000), ("test", 250))
        for c in ("1", "2", "3", "5", "6") for r in ("1.0", "5.0")
    }  # fmt: skip
    ones = {(c, int(i)) for side, _, c, r, i in picked if side == "train" and r == "1.0"}
    assert ones == {(c, i) for c in ("1", "2", "3", "5", "6") for i in range(1000)}


def test_amazon_sentiment_selects_ratings_across_all_categories(tmp_path):
    """Ratings 1.0 and 5.0, whatever the category (0 and 4 are in no category set); the
    3.0 reviews are left out. Each rating has exactly what is drawn, so all of it."""
    folder = tmp_path / "amazon"
    for split, n in (("train", 2000), ("test", 500)):
        per = {(c, r): n // 5 for c in (0, 1, 2, 4, 6) for r in (1.0, 5.0)}
        per[(3, 3.0)] = 300
        _jsonl(folder / f"{split}.jsonl", _amazon_rows(split, per))
    picked = _picked(_load("amazon_reviews_sentiment", folder))
    assert sorted(picked) == sorted(
        (side, f"{r}", f"{c}", f"{r}", f"{i}")
        for side, n in (("train", 2000), ("test", 500))
        for c in (0, 1, 2, 4, 6) for r in (1.0, 5.0) for i in range(n // 5)
    )  # fmt: skip


def test_ag_news_selects_2000_and_500_per_label(tmp_path):
    folder = tmp_path / "ag_news"
    for split, n in (("train", 2000), ("test", 500)):
        rows = [{"text": f"{split}:{lab}:{i}", "label": lab} for lab in range(4)
                for i in range(n + (150 if lab == 0 and split == "train" else 0))]  # fmt: skip
        _jsonl(folder / f"{split}.jsonl", rows)
    picked = _picked(_load("ag_news", folder))
    assert Counter((side, lab) for side, lab, *_ in picked) == {
        (side, str(lab)): n for side, n in (("train", 2000), ("test", 500)) for lab in range(4)
    }
    assert {(lab, int(i)) for side, lab, _, i in picked if side == "train" and lab != "0"} == {
        (str(lab), i) for lab in (1, 2, 3) for i in range(2000)
    }


def test_europarl_reads_each_language_from_its_pair_in_stream_order(tmp_path):
    """One config per language pair, as on the hub: a language's rows are the first 2501
    of its pair (read until it has more than 2500), its text translation[language]."""
    folder = tmp_path / "europarl"
    configs = []
    for pair in EUROPARL_PAIRS.values():
        a, b = pair.split("-")
        rows = [{"translation": {a: f"{pair}:{a}:{i}", b: f"{pair}:{b}:{i}"}} for i in range(2600)]
        _jsonl(folder / pair / "train.jsonl", rows)
        files = f"  data_files:\n  - split: train\n    path: {pair}/train.jsonl\n"
        configs.append(f"- config_name: {pair}\n{files}")
    (folder / "README.md").write_text("---\nconfigs:\n" + "".join(configs) + "---\n")
    data = _load("europarl", folder)
    assert data.is_test is not None
    seen: dict[str, set[int]] = {lang: set() for lang in EUROPARL_PAIRS}
    for text, lang in zip(data.texts, data.labels, strict=True):
        pair, text_lang, i = text.split(":")
        assert (pair, text_lang) == (EUROPARL_PAIRS[lang], lang)
        seen[lang].add(int(i))
    sides = Counter((lang, t) for lang, t in zip(data.labels, data.is_test, strict=True))
    assert sides == {(lang, t): 500 if t else 2000 for lang in EUROPARL_PAIRS for t in (0, 1)}
    for lang in EUROPARL_PAIRS:
        assert len(seen[lang]) == 2500 and seen[lang] <= set(range(2501))


def _code(lang: str, tag: str, length: int) -> dict:
    body = f"{lang}:{tag}:"
    return {"code": "H" * 150 + body + "x" * (length - 150 - len(body)), "language": lang,
            "repo_name": "decoy"}  # fmt: skip


def test_github_code_streams_filters_and_cuts_the_licence_header(tmp_path):
    """Stream order: 3000 rows of four languages (with too-short rows and Ruby among
    them), then the 2501 C rows that fill the last class (half exactly 535 characters
    long, the shortest kept), then a tail that is never read."""
    rows = []
    for i in range(3000):
        rows += [_code(lang, f"a{i}", 600) for lang in ("Python", "HTML", "Java", "PHP")]
        if i % 10 == 0:
            rows += [_code("Ruby", f"a{i}", 600), _code("Python", f"short{i}", 534)]
    for i in range(2501):
        rows.append(_code("C", f"a{i}", 535 if i % 2 else 600))
        if i % 10 == 0:
            rows.append(_code("C", f"short{i}", 534))
    rows += [
        _code(lang, f"tail{i}", 600)
        for i in range(50)
        for lang in SAEBENCH["codeparrot/github-code"][1]
    ]
    _jsonl(tmp_path / "github-code" / "train.jsonl", rows)
    data = _load("github_code", tmp_path / "github-code")
    assert data.is_test is not None
    assert Counter(zip(data.labels, data.is_test, strict=True)) == {
        (lang, t): 500 if t else 2000
        for lang in SAEBENCH["codeparrot/github-code"][1]
        for t in (0, 1)
    }
    tags: dict[str, set[str]] = {}
    for text, lang in zip(data.texts, data.labels, strict=True):
        text_lang, tag, pad = text.split(":")
        assert text_lang == lang and set(pad) <= {"x"}  # the 150 header characters cut
        tags.setdefault(lang, set()).add(tag)
    assert tags["C"] < {f"a{i}" for i in range(2501)} and len(tags["C"]) == 2500
    for lang in ("Python", "HTML", "Java", "PHP"):
        assert tags[lang] <= {f"a{i}" for i in range(3000)}  # no short row, no tail


def test_a_preset_through_the_task(tiny_llama, tmp_path):
    """The drawn sides reach the probing tasks: 4 one-vs-rest tasks of 2 x 12 train and
    2 x 10 test examples, whatever the document hash would have said."""
    folder = tmp_path / "ag_news"
    for split, n in (("train", 14), ("test", 10)):
        rows = [
            {"text": "abcd"[lab] * (3 + i % 5), "label": lab} for lab in range(4) for i in range(n)
        ]
        _jsonl(folder / f"{split}.jsonl", rows)
    entry = {"preset": "ag_news", "name": str(folder), "train_per_class": 12, "test_per_class": 10}
    opts = {"datasets": [entry], "ks": [1], "ctx_len": 8, "min_test_per_class": 3, "dense": False}
    env = _env(tiny_llama, opts)
    (ds,) = ProbingTexts(env, options_with_defaults(opts)).datasets
    assert [(t.name, len(t.train), len(t.test)) for t in ds["tasks"]] == [
        (f"ag_news/{lab}", 24, 20) for lab in range(4)
    ]
    result = SparseProbing().run(ReluSAE(tiny_llama.d_model, 16), env)
    assert result.metrics["n_tasks"] == 4.0


# --- the new fields' checks -------------------------------------------------------------

_OK = {"name": "x", "text_column": "t", "label_column": "y"}


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ({**_OK, "classes": "a"}, "'classes' is a non-empty list of labels"),
        ({**_OK, "classes": ["a", "a"]}, "lists a value twice"),
        ({**_OK, "train_per_class": 10}, "go together"),
        (
            {**_OK, "train_per_class": 0, "test_per_class": 1},
            "'train_per_class' is an integer >= 1",
        ),
        ({**_OK, "balance_by": "g"}, "'balance_by' needs 'train_per_class'"),
        ({**_OK, "train_per_class": 2, "test_per_class": 2, "max_examples": 9}, "not both"),
        ({**_OK, "train_per_class": 2, "test_per_class": 2, "streaming": True}, "needs 'classes'"),
        ({**_OK, "streaming": "yes"}, "'streaming' is true or false"),
        ({**_OK, "min_chars": -1}, "'min_chars' is an integer >= 0"),
        ({**_OK, "test_split": "train"}, "must differ"),
        ({"name": "x", "class_sources": {"a": {"subset": "s"}}}, "needs a 'text_column'"),
        ({**_OK, "class_sources": {"a": {"subset": "s"}}}, "takes no 'label_column'"),
        ({"preset": "no_such"}, "unknown preset 'no_such'"),
        ({"preset": "europarl", "classes": ["en", "xx"]}, "class 'xx' is in 'classes'"),
    ],
)
def test_bad_entry_fields_are_one_line(entry, fragment):
    with pytest.raises(UserError) as e:
        SparseProbing.validate_options({"datasets": [entry]})
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_test_split_without_per_class_counts(tmp_path):
    """A user entry may name a `test_split` alone: every row (under max_examples) of
    each split, on its own side, instead of the document split."""
    folder = tmp_path / "d"
    for split, n in (("train", 30), ("validation", 12)):
        _jsonl(folder / f"{split}.jsonl", [{"t": f"{split}:{i}", "y": i % 2} for i in range(n)])
    entry = {"name": str(folder), "text_column": "t", "label_column": "y"}
    data = pdata.load_entry(pdata.resolve_entry({**entry, "test_split": "validation"}), 0)
    assert data.is_test == [False] * 30 + [True] * 12
    assert [t.split(":")[0] for t in data.texts] == ["train"] * 30 + ["validation"] * 12
    assert pdata.load_entry(pdata.resolve_entry(entry), 0).is_test is None


def test_too_few_rows_and_one_balance_value_name_the_class(tmp_path):
    folder = tmp_path / "d"
    _jsonl(folder / "train.jsonl", [{"t": "x", "y": c, "g": 0} for c in "ab" for _ in range(6)])
    base = {"name": str(folder), "text_column": "t", "label_column": "y"}
    with pytest.raises(UserError, match="has 6 rows of class 'a' in split 'train' \\(needs 8\\)"):
        pdata.load_entry(
            pdata.resolve_entry({**base, "train_per_class": 5, "test_per_class": 3}), 0
        )
    with pytest.raises(UserError, match="class 'a' has one value of 'g'"):
        entry = {**base, "train_per_class": 2, "test_per_class": 2, "balance_by": "g"}
        pdata.load_entry(pdata.resolve_entry(entry), 0)
