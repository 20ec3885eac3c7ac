"""Files damaged on purpose (truncated, bytes flipped) are reported with their path and
regenerated, and the regenerated results equal the originals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from reliability_helpers import configs_of, results_of, snapshot, weights_of

from dictbench import cli as dictbench_cli

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def original(tmp_path_factory, tiny_spec_factory) -> Path:
    """One finished tiny run (out/ and cache/) that each test copies and damages."""
    base = tmp_path_factory.mktemp("damaged")
    data = tiny_spec_factory(base / "cache")
    data["baselines"] = [{"method": "l1"}, {"method": "topk", "params": {"k": 8}}]
    (base / "spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    assert dictbench_cli.main(["run", str(base / "spec.yaml"), "--out", str(base / "out")]) == 0
    return base


@pytest.fixture
def copy(original, tmp_path) -> Path:
    shutil.copytree(original / "out", tmp_path / "out")
    shutil.copytree(original / "cache", tmp_path / "cache")
    return tmp_path


def rerun(copy: Path, capsys) -> str:
    """`dictbench run --resume --out` on the copy (the spec recorded in its run.json)."""
    capsys.readouterr()
    out, cache = copy / "out", copy / "cache"
    code = dictbench_cli.main(["run", "--resume", "--out", str(out), "--set", f"cache_dir={cache}"])
    text = capsys.readouterr().out
    assert code == 0, text[-2000:]
    return text


def flip(path: Path, at: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_truncated_task_record_is_scored_again(copy, original, capsys):
    record = copy / "out/results/topk/downstream.json"
    record.write_text(record.read_text()[:50])
    text = rerun(copy, capsys)
    assert f"--resume: {record} is damaged or from another run; scoring again" in text
    assert "--resume: topk is trained; scoring downstream" in text
    assert "--resume: l1 is complete; skipped" in text
    assert results_of(copy / "out") == results_of(original / "out")


def test_damaged_sae_weights_are_retrained_to_the_same_bytes(copy, original, capsys):
    weights = copy / "out/saes/l1/sae_weights.safetensors"
    flip(weights)  # a value changes; the file still parses
    text = rerun(copy, capsys)
    assert f"--resume: {weights} is missing or damaged; retraining" in text
    assert weights_of(copy / "out") == weights_of(original / "out")
    assert results_of(copy / "out") == results_of(original / "out")


def test_damaged_sae_config_is_regenerated(copy, original, capsys):
    config = copy / "out/saes/topk/cfg.json"
    config.write_text(config.read_text()[:30])
    text = rerun(copy, capsys)
    assert f"--resume: {config} is missing or damaged; retraining" in text
    assert configs_of(copy / "out") == configs_of(original / "out")
    assert weights_of(copy / "out") == weights_of(original / "out")
    assert results_of(copy / "out") == results_of(original / "out")


@pytest.mark.parametrize(
    "target,damage",
    [
        ("train-*/acts.npy", "truncate"),
        ("train-*/acts.npy", "flip"),
        ("eval-*/tokens.npy", "flip"),
        ("eval-*/mean.npy", "flip"),
        ("train-*/meta.json", "truncate"),
    ],
)
def test_damaged_cache_entry_is_rebuilt_not_used(target, damage, copy, original, capsys):
    path = next((copy / "cache").glob(target))
    entry = path.parent
    want = np.load(original / "cache" / entry.name / path.name) if path.suffix == ".npy" else None
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        flip(path, at=path.stat().st_size // 2 if "acts" in path.name else -1)
    # a new run (not a resume) into a fresh folder, against the damaged cache
    capsys.readouterr()
    spec = yaml.safe_load((original / "spec.yaml").read_text())
    spec["cache_dir"] = str(copy / "cache")
    (copy / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert dictbench_cli.main(["run", str(copy / "spec.yaml"), "--out", str(copy / "new")]) == 0
    text = capsys.readouterr().out
    assert f"activation cache: {entry} is damaged (" in text
    assert "rebuilding it" in text
    assert (
        f"activation cache: harvested {entry.name.split('-')[0]} activations into {entry}" in text
    )
    if want is not None:
        assert np.array_equal(np.load(path), want)
    assert results_of(copy / "new") == results_of(original / "out")
    assert not [p for p in (copy / "cache").iterdir() if p.name.startswith(".")]


def test_resume_cleans_an_unfinished_atomic_write(copy, original, capsys):
    partial = copy / "out/results/l1/.sparsity.json.abc123.tmp"
    partial.write_text('{"sae_id": "l1", "met')
    before = snapshot(copy / "out")
    text = rerun(copy, capsys)
    assert f"--resume: removed the unfinished write {partial}" in text
    after = snapshot(copy / "out")
    del before[str(partial.relative_to(copy / "out"))]
    assert {k: v for k, v in after.items() if k != "run.json"} == {
        k: v for k, v in before.items() if k != "run.json"
    }
    assert json.loads(after["run.json"])["status"] == "complete"


def test_entries_over_the_size_limit_hash_a_sample_that_covers_both_ends(
    tiny_llama, tiny_corpus_dir, tmp_path, monkeypatch
):
    from dictbench.data import cache
    from dictbench.data.corpus import CorpusSpec

    monkeypatch.setattr(cache, "FULL_HASH_MAX_BYTES", 0)  # as if the entry were huge
    corpus = CorpusSpec(
        name="local", data_files=[str(tiny_corpus_dir / "*.txt")], format="text", ctx_len=16
    )
    store = cache.harvest(
        tiny_llama, "resid_post.1", cache.EntryRequest(corpus, "train", 100 * 15, 0), tmp_path
    )
    n = store.acts.shape[0]
    assert n == 100 > cache.SAMPLE_WINDOWS
    sums = json.loads((store.path / "meta.json").read_text())["checksums"]
    assert "acts" not in sums and sums["acts_sample_windows"] == cache.SAMPLE_WINDOWS
    acts = store.path / "acts.npy"
    offset, window_bytes = store.acts.offset, store.acts[0].nbytes
    del store
    for window in (0, n - 1):  # the first and the last window are always in the sample
        flip(acts, at=offset + window * window_bytes + 7)
        with pytest.raises(cache.CacheDamaged, match="acts.npy sampled checksum"):
            cache.ActivationStore.open(acts.parent)
        flip(acts, at=offset + window * window_bytes + 7)  # undo
        cache.ActivationStore.open(acts.parent)
