"""`dictbench eval` on a tiny model: SAEs saved by dictbench, exported to SAELens, or
written by hand in SAELens's layout, scored with the run's own tasks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_subprocess import run_cli
from safetensors.torch import save_file

from dictbench import cli, evaluate
from dictbench.data.cache import ActivationStore
from dictbench.errors import UserError
from dictbench.io import saelens
from dictbench.io.sae_io import CONFIG, WEIGHTS
from dictbench.score.records import read_records

# Tiny models run far faster on one thread when other processes load the CPU, and one
# thread on both sides (subprocess and this process) keeps float sums in the same order.
pytestmark = pytest.mark.usefixtures("torch_one_thread")

TASKS = ["sparsity", "reconstruction", "shrinkage", "downstream", "dead_latents"]
D_MODEL = 32  # tests/conftest.py's tiny llama


def dictbench(*args: str, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(*args, cache=cache, cwd=cwd, one_thread=True)


def records_by_task(out: Path, sae_id: str) -> dict[str, dict]:
    return {r["task"]: r for r in read_records(out) if r["sae_id"] == sae_id}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_spec_factory):
    """`dictbench run` of the tiny spec with an L1 and a TopK SAE (a real subprocess)."""
    base = tmp_path_factory.mktemp("eval_cmd")
    spec = tiny_spec_factory(base / "cache")
    spec["baselines"] = [
        {"method": "l1", "params": {"l1_coefficient": 1.0}},
        {"method": "topk", "params": {"k": 8}},
    ]
    spec_path = base / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    res = dictbench("run", str(spec_path), "--out", str(base / "run"), cache=base / "env", cwd=base)
    assert res.returncode == 0, res.stderr[-3000:]
    return base, spec_path


def assert_same_records(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert set(a) >= set(TASKS) and set(b) == set(TASKS)
    for task in TASKS:
        for key in ("metrics", "details", "eval_tokens", "context", "baseline"):
            assert a[task][key] == b[task][key], (task, key)


# --- round trip: run -> export -> eval gives the run's records ---------------------------------


def test_eval_of_the_saelens_export_reproduces_the_run(tiny_run):
    """Identical, not merely close: the export computes bit-identical latents and
    reconstructions (tests/test_saelens.py), the evaluation split and the mean training
    activation come from the run's own cache entries, and both sides run in a fresh
    interpreter with the same settings, so every float64 sum adds the same numbers in
    the same order."""
    base, _ = tiny_run
    exported = saelens.export(base / "run" / "saes" / "l1", base / "l1-saelens")
    res = dictbench("eval", str(exported), "--out", str(base / "ev"), cache=base / "env", cwd=base)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "recorded with the SAE" in res.stdout
    assert "reusing eval activations" in res.stdout and "harvested" not in res.stdout
    run, ev = records_by_task(base / "run", "l1"), records_by_task(base / "ev", "l1")
    assert_same_records(run, ev)
    info = json.loads((base / "ev" / "eval.json").read_text())
    assert info["status"] == "complete"
    assert info["sae"]["format"] == "saelens" and info["sae"]["baseline"] == "l1"
    assert info["train_mean"]["source"] == "training cache of the spec"


def test_eval_of_a_dictbench_sae_folder(tiny_run):
    """In-process this time; the tiny model's matmuls are small enough that torch runs
    them single-threaded, so the records are identical to the subprocess run's too."""
    base, _ = tiny_run
    out = evaluate.evaluate(base / "run" / "saes" / "topk", out=base / "ev-topk")
    assert_same_records(records_by_task(base / "run", "topk"), records_by_task(out, "topk"))


def test_tasks_subset_and_sae_id(tiny_run, capsys):
    base, _ = tiny_run
    out = base / "ev-subset"
    args = ["eval", str(base / "run" / "saes" / "l1"), "--tasks", "sparsity,shrinkage"]
    assert cli.main([*args, "--out", str(out), "--sae-id", "renamed"]) == 0
    recs = read_records(out)
    assert sorted(r["task"] for r in recs) == ["shrinkage", "sparsity"]
    assert {r["sae_id"] for r in recs} == {"renamed"}
    run = records_by_task(base / "run", "l1")
    for r in recs:
        assert r["metrics"] == run[r["task"]]["metrics"]


# --- SAEs trained elsewhere --------------------------------------------------------------------


def identity_saelens(folder: Path, hook_name: str, d_in: int = D_MODEL) -> tuple[Path, np.ndarray]:
    """A SAELens 'standard' SAE that reconstructs exactly: latents ReLU(x - b) and
    ReLU(b - x), decoder [I; -I], so x_hat = x. Every metric has a closed form."""
    b_dec = torch.randn(d_in, generator=torch.Generator().manual_seed(3))
    eye = torch.eye(d_in)
    tensors = {
        "W_enc": torch.cat([eye, -eye], dim=1),
        "b_enc": torch.zeros(2 * d_in),
        "W_dec": torch.cat([eye, -eye], dim=0),
        "b_dec": b_dec,
    }
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / WEIGHTS))
    cfg = {
        "d_in": d_in,
        "d_sae": 2 * d_in,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12", "hook_name": hook_name, "model_name": "x"},
        "architecture": "standard",
    }
    (folder / CONFIG).write_text(json.dumps(cfg))
    return folder, b_dec.double().numpy()


def test_foreign_saelens_sae_gets_closed_form_metrics(tmp_path, tiny_spec_file, capsys):
    folder, b_dec = identity_saelens(tmp_path / "identity", "blocks.1.hook_resid_post")
    out = evaluate.evaluate(folder, spec_path=str(tiny_spec_file), out=tmp_path / "ev")
    assert "the SAE names model 'x'" in capsys.readouterr().out
    recs = records_by_task(out, "identity")
    assert {r["baseline"] for r in recs.values()} == {"saelens-standard"}
    m = {k: v for r in recs.values() for k, v in r["metrics"].items()}
    assert m["explained_variance"] == pytest.approx(1, abs=1e-6)
    assert m["cossim"] == pytest.approx(1, abs=1e-6)
    assert m["relative_reconstruction_bias"] == pytest.approx(1, abs=1e-6)
    assert m["delta_ce"] == pytest.approx(0, abs=1e-5)
    assert m["kl"] == pytest.approx(0, abs=1e-6)
    assert m["ce_loss_recovered"] == pytest.approx(1, abs=1e-5)
    # exactly one of ReLU(x_i - b_i), ReLU(b_i - x_i) is non-zero per dimension
    assert m["l0"] == D_MODEL
    # l1 = E sum_i |x_i - b_i| over the evaluation tokens, read from the cache directly
    info = json.loads((out / "eval.json").read_text())
    store = ActivationStore.open(Path(info["caches"]["eval"]))
    x = np.asarray(store.acts)[:, store.keep].reshape(-1, D_MODEL).astype(np.float64)
    n = recs["sparsity"]["eval_tokens"]
    assert m["l1"] == pytest.approx(np.abs(x[:n] - b_dec).sum(-1).mean(), rel=1e-5)
    # no training cache for a spec nobody ran: the mean comes from a smaller harvest,
    # which the downstream record (only it: the mean is its ablation baseline) names
    assert info["train_mean"]["source"] == "training split, part"
    n_mean = info["train_mean"]["tokens"]
    assert recs["downstream"]["context"]["mean_ablation"] == f"first {n_mean} training tokens"
    assert "mean_ablation" not in recs["reconstruction"]["context"]


def test_wrong_width_is_one_line(tmp_path, tiny_spec_file):
    folder, _ = identity_saelens(tmp_path / "wide", "blocks.1.hook_resid_post", d_in=16)
    with pytest.raises(UserError, match="reads 16-dimensional activations but tiny:llama has"):
        evaluate.evaluate(folder, spec_path=str(tiny_spec_file), out=tmp_path / "ev")
    assert not (tmp_path / "ev").exists()


def test_spec_resolution(tmp_path, tiny_spec_file):
    folder, _ = identity_saelens(tmp_path / "pre4", "blocks.4.hook_resid_pre")
    loaded = evaluate.load_any(folder)
    # no spec recorded and none given: the quickstart preset at the SAE's own hook
    spec, source = evaluate.resolve_spec(loaded)
    assert (spec.preset, spec.hook) == ("quickstart", "resid_pre.4")
    assert spec.model.name == "embedded:smollm2-135m"
    assert "quickstart" in source and spec.baselines == []
    # a spec at another stream position is refused, naming both hooks
    with pytest.raises(UserError, match="spec hooks resid_post.1 but the SAE was trained at"):
        evaluate.resolve_spec(loaded, spec_path=str(tiny_spec_file))
    # resid_post.3 is the same residual stream as resid_pre.4
    spec, _ = evaluate.resolve_spec(
        loaded, spec_path=str(tiny_spec_file), overrides=["hook=resid_post.3"]
    )
    assert spec.hook == "resid_post.3"
    mlp, _ = identity_saelens(tmp_path / "mlp", "blocks.1.hook_mlp_out")
    with pytest.raises(UserError, match="not a residual-stream point"):
        evaluate.resolve_spec(evaluate.load_any(mlp))


def test_bad_tasks_are_refused(tmp_path, tiny_spec_file):
    folder, _ = identity_saelens(tmp_path / "i", "blocks.1.hook_resid_post")
    with pytest.raises(UserError, match="nosuch"):
        evaluate.resolve_spec(evaluate.load_any(folder), str(tiny_spec_file), tasks=["nosuch"])


def test_pickle_is_refused_by_the_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "sae.pt"
    torch.save({"W_enc": torch.zeros(2)}, path)
    assert cli.main(["eval", str(path)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dictbench: error: ")
    assert "pickle" in lines[0] and str(path) in lines[0]
    assert not (tmp_path / "runs").exists()


def test_missing_tensor_is_one_line_from_the_cli(tmp_path, capsys):
    folder, _ = identity_saelens(tmp_path / "m", "blocks.1.hook_resid_post")
    tensors = {"W_enc": torch.zeros(D_MODEL, 2 * D_MODEL), "b_enc": torch.zeros(2 * D_MODEL)}
    save_file(tensors, str(folder / WEIGHTS))
    assert cli.main(["eval", str(folder), "--out", str(tmp_path / "ev")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "missing tensor(s) W_dec, b_dec for a standard SAE" in err[0]
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize(
    "cmd,options",
    [
        ("eval", ["PATH", "--tasks", "--spec", "--preset", "--set", "--out", "--mean-tokens"]),
        ("export", ["SAE_DIR", "OUT", "--format", "saelens"]),
    ],
)
def test_help_documents_the_options(cmd, options, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([cmd, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dictbench {cmd}")
    for option in options:
        assert option in out
