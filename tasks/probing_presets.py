"""SAEBench's sparse-probing datasets as named entries of the ``datasets`` option.

Every fact below is read off SAEBench 0.6's own source; the comments name the file in
the ``sae_bench`` package it comes from (``info`` = sae_bench_utils/dataset_info.py,
``utils`` = sae_bench_utils/dataset_utils.py, ``config`` =
evals/sparse_probing/eval_config.py, ``main`` = evals/sparse_probing/main.py).
tests/test_probing_presets.py holds the same facts as a hand-written table, so an edit
here that drifts from SAEBench fails a test.

Shared by all of them (config: probe_train_set_size 4000, probe_test_set_size 1000,
context_length 128, random_seed 42): a class gets half of a binary task's 4000 / 1000
examples, 2000 train and 500 test (utils: ``train_set_size // 2``; ``// 4`` per
quadrant where a second column balances the class in two halves). Texts are cut to
their first 128 tokens (main: ``tokenize_data_dictionary`` with ``truncation=True``),
which is this task's ``ctx_len`` default.
"""

from __future__ import annotations

from typing import Any

TRAIN_PER_CLASS = 2000  # utils: get_*_dataset, train_set_size // 2 (or 2 x // 4)
TEST_PER_CLASS = 500  # utils: the same of test_set_size

# The hub's own train and test splits (utils: get_bias_in_bios_or_amazon_product_dataset,
# get_amazon_sentiment_dataset and get_ag_news_dataset load dataset["train"] and
# dataset["test"]), a class drawn from each with pandas' seeded sample.
_HUB_SPLITS = {
    "split": "train",
    "test_split": "test",
    "train_per_class": TRAIN_PER_CLASS,
    "test_per_class": TEST_PER_CLASS,
}
# info: dataset_metadata["LabHC/bias_in_bios"]: text hard_text, column1 profession
# (ids of profession_dict), column2 gender; utils strips "_class_set<n>" off the name.
# Each profession is drawn as two equal halves by gender (utils: get_balanced_dataset, a
# quadrant of set_size // 4 per value of column2_name).
_BIOS = {
    "name": "LabHC/bias_in_bios",
    "text_column": "hard_text",
    "label_column": "profession",
    "balance_by": "gender",
    **_HUB_SPLITS,
}

PRESETS: dict[str, dict[str, Any]] = {
    # info: chosen_classes_per_dataset; the names are profession_dict's.
    # accountant, architect, attorney, dentist, filmmaker
    "bias_in_bios_class_set1": {**_BIOS, "classes": ["0", "1", "2", "6", "9"]},
    # journalist, nurse, painter, photographer, physician
    "bias_in_bios_class_set2": {**_BIOS, "classes": ["11", "13", "14", "18", "19"]},
    # poet, professor, psychologist, surgeon, teacher
    "bias_in_bios_class_set3": {**_BIOS, "classes": ["20", "21", "22", "25", "26"]},
    # Not one of SAEBench's probing sets (its gender labels, info: gender_dict male 0 /
    # female 1, serve SCR and TPP): dictbench's own, its two classes drawn as SAEBench
    # draws the sentiment set's.
    "bias_in_bios_gender": {
        "name": "LabHC/bias_in_bios",
        "text_column": "hard_text",
        "label_column": "gender",
        "classes": ["0", "1"],
        **_HUB_SPLITS,
    },
    # info: dataset_metadata["canrager/amazon_reviews_mcauley_1and5"]: text, column1
    # category (ids of amazon_category_dict), column2 rating, so each category is drawn
    # as two equal halves by rating (utils: get_balanced_dataset); chosen classes 1 2 3 5
    # 6 = Toys_and_Games, Cell_Phones_and_Accessories, Industrial_and_Scientific,
    # Musical_Instruments, Electronics.
    "amazon_reviews_category": {
        "name": "canrager/amazon_reviews_mcauley_1and5",
        "text_column": "text",
        "label_column": "category",
        "balance_by": "rating",
        "classes": ["1", "2", "3", "5", "6"],
        **_HUB_SPLITS,
    },
    # utils: get_amazon_sentiment_dataset strips "_sentiment" (the hub dataset is the
    # same one) and draws set_size // 2 per rating, not balanced by category; info:
    # chosen classes "1.0" and "5.0" (the ratings are floats).
    "amazon_reviews_sentiment": {
        "name": "canrager/amazon_reviews_mcauley_1and5",
        "text_column": "text",
        "label_column": "rating",
        "classes": ["1.0", "5.0"],
        **_HUB_SPLITS,
    },
    # utils: get_ag_news_dataset: the train and test splits, label ids as strings
    # (info: "0".."3" = World, Sports, Business, Sci/Tech), set_size // 2 per class.
    "ag_news": {
        "name": "fancyzhx/ag_news",
        "text_column": "text",
        "label_column": "label",
        "classes": ["0", "1", "2", "3"],
        **_HUB_SPLITS,
    },
    # utils: get_europarl_dataset: each language is read from its own language-pair
    # config of the train split, streamed until it has more than 2500 rows, and its text
    # is translation[language]; train and test are cut from a shuffle of those rows.
    "europarl": {
        "name": "Helsinki-NLP/europarl",
        "class_sources": {
            lang: {"subset": pair, "text_column": f"translation.{lang}"}
            for lang, pair in (
                ("en", "en-fr"),
                ("fr", "fr-it"),
                ("de", "de-en"),
                ("es", "es-fr"),
                ("nl", "nl-pt"),
            )
        },
        "split": "train",
        "streaming": True,
        "train_per_class": TRAIN_PER_CLASS,
        "test_per_class": TEST_PER_CLASS,
    },
    # utils: get_github_code_dataset: the train split streamed, language in the chosen
    # classes (info), code longer than 128 * 3 + 50 * 3 = 534 characters, its first 150
    # characters (50 tokens at 3 characters each: licence headers) dropped; streamed
    # until every language has more than 2500 rows, then shuffled and cut.
    "github_code": {
        "name": "codeparrot/github-code",
        "text_column": "code",
        "label_column": "language",
        "classes": ["C", "Python", "HTML", "Java", "PHP"],
        "split": "train",
        "streaming": True,
        "min_chars": 535,
        "skip_chars": 150,
        "train_per_class": TRAIN_PER_CLASS,
        "test_per_class": TEST_PER_CLASS,
    },
}

# SAEBench's dataset names (config: SparseProbingEvalConfig.dataset_names, in order)
# and the preset each one is here.
SAEBENCH_NAMES: dict[str, str] = {
    "LabHC/bias_in_bios_class_set1": "bias_in_bios_class_set1",
    "LabHC/bias_in_bios_class_set2": "bias_in_bios_class_set2",
    "LabHC/bias_in_bios_class_set3": "bias_in_bios_class_set3",
    "canrager/amazon_reviews_mcauley_1and5": "amazon_reviews_category",
    "canrager/amazon_reviews_mcauley_1and5_sentiment": "amazon_reviews_sentiment",
    "codeparrot/github-code": "github_code",
    "fancyzhx/ag_news": "ag_news",
    "Helsinki-NLP/europarl": "europarl",
}

# Names that stand for several presets.
GROUPS: dict[str, list[str]] = {
    "saebench": list(SAEBENCH_NAMES.values()),  # SAEBench's default list
    "bias_in_bios_profession": [f"bias_in_bios_class_set{i}" for i in (1, 2, 3)],
}


def preset_name(name: str) -> str | None:
    """The preset a name (a preset's own or SAEBench's) stands for, else None."""
    if name in PRESETS:
        return name
    return SAEBENCH_NAMES.get(name)
