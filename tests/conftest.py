"""Shared fixtures: tiny randomly initialised subject models (byte tokenizer, vocab 257).

Session-scoped because building them costs a few hundred milliseconds each; tests
that register hooks on them must remove the hooks before returning.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from dictbench.allocator import keep_freed_memory
from dictbench.data.subject import ModelSpec, SubjectModel

keep_freed_memory()  # as the CLI runs: large tensors reuse freed memory

TINY_CONFIGS = {
    "tiny:llama": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "tiny:gpt2": dict(n_embd=32, n_layer=3, n_head=4, n_positions=64),
    "tiny:gpt_neox": dict(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64
    ),
}


def _load_tiny(name: str) -> SubjectModel:
    return SubjectModel.load(ModelSpec(name=name, device="cpu", config=TINY_CONFIGS[name]))


@pytest.fixture(scope="session")
def torch_one_thread() -> Iterator[None]:
    """Tiny models run ~100x faster on one thread when another process loads the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama(torch_one_thread) -> SubjectModel:
    return _load_tiny("tiny:llama")


@pytest.fixture(scope="session")
def tiny_llama_bf16(torch_one_thread) -> SubjectModel:
    """The tiny llama in bfloat16, as a GPU user would load a subject (model.dtype)."""
    spec = ModelSpec(
        name="tiny:llama", device="cpu", dtype="bfloat16", config=TINY_CONFIGS["tiny:llama"]
    )
    return SubjectModel.load(spec)


@pytest.fixture(scope="session")
def tiny_gpt2(torch_one_thread) -> SubjectModel:
    return _load_tiny("tiny:gpt2")


@pytest.fixture(scope="session")
def tiny_gpt_neox(torch_one_thread) -> SubjectModel:
    return _load_tiny("tiny:gpt_neox")


@pytest.fixture(scope="session")
def tiny_subjects(tiny_llama, tiny_gpt2, tiny_gpt_neox) -> dict[str, SubjectModel]:
    """All three tiny architectures by spec name."""
    return {"tiny:llama": tiny_llama, "tiny:gpt2": tiny_gpt2, "tiny:gpt_neox": tiny_gpt_neox}


@pytest.fixture(scope="session")
def tiny_token_ids() -> torch.Tensor:
    """[3, 12] byte ids, each row starting with BOS (256) like corpus windows do."""
    g = torch.Generator().manual_seed(1234)
    body = torch.randint(0, 256, (3, 11), generator=g)
    return torch.cat([torch.full((3, 1), 256), body], dim=1)


# --- tiny end-to-end corpus and spec (spec, corpus, cache and CLI tests) ----------------

TINY_WORDS = (
    "the a river stone quietly builds many old green small bright city people think walk "
    "under over light sound table window market garden winter summer letter number reason "
    "history government nation free strong every morning across distant mountain carefully "
    "questions answer bridge between silver north quick slow harbour engine paper"
).split()
TINY_N_DOCS = 24
TINY_DOC_BYTES = 1500


def _write_tiny_corpus(folder, n_docs: int = TINY_N_DOCS, seed: int = 0):
    """``n_docs`` text files of seeded English-like sentences, ~1.5 KB each."""
    import random

    from dictbench.data.corpus import in_eval_split

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(n_docs):
        sentences, size = [], 0
        while size < TINY_DOC_BYTES:
            words = [rng.choice(TINY_WORDS) for _ in range(rng.randint(5, 14))]
            sentence = " ".join(words).capitalize() + "."
            sentences.append(sentence)
            size += len(sentence) + 1
        (folder / f"doc{i:02d}.txt").write_text(" ".join(sentences) + "\n")
    # The specs below use seed 0 and eval_fraction 0.3: both splits must be non-empty.
    evals = [in_eval_split(i, 0, 0.3) for i in range(n_docs)]
    assert any(evals) and not all(evals)
    return folder


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory):
    """A folder of 24 small text documents (read-only for tests; shared by the session)."""
    return _write_tiny_corpus(tmp_path_factory.mktemp("tiny_corpus") / "docs")


@pytest.fixture(scope="session")
def tiny_spec_factory(tiny_corpus_dir):
    """``make(cache_dir) -> dict``: a complete tiny run spec (no preset) as plain data."""

    def make(cache_dir) -> dict:
        return {
            "name": "tiny",
            "model": {"name": "tiny:llama", "config": dict(TINY_CONFIGS["tiny:llama"])},
            "hook": "resid_post.1",
            "corpus": {
                "name": "local",
                "data_files": [str(tiny_corpus_dir / "*.txt")],
                "format": "text",
                "ctx_len": 16,
                "eval_fraction": 0.3,
            },
            "budget": {"train_tokens": 4096, "batch_size": 256, "d_sae": 64, "lr": 0.001},
            "eval": {"tokens": 1024, "downstream_tokens": 256, "batch_tokens": 512},
            "baselines": [{"method": "l1", "params": {"l1_coefficient": 1.0}}],
            "tasks": ["sparsity", "reconstruction", "shrinkage", "downstream", "dead_latents"],
            "cache_dir": str(cache_dir),
        }

    return make


@pytest.fixture
def tiny_cache_env(tmp_path, monkeypatch):
    """Points DICTBENCH_CACHE at a fresh temporary folder and returns it."""
    root = tmp_path / "dictbench_cache_env"
    monkeypatch.setenv("DICTBENCH_CACHE", str(root))
    return root


@pytest.fixture
def tiny_spec_data(tmp_path, tiny_spec_factory, tiny_cache_env) -> dict:
    """A fresh copy of the tiny spec whose cache_dir is under this test's tmp_path."""
    return tiny_spec_factory(tmp_path / "cache")


@pytest.fixture
def tiny_spec_file(tmp_path, tiny_spec_data):
    """The tiny spec written as YAML to ``tmp_path/tiny.yaml``."""
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_data, sort_keys=False))
    return path
