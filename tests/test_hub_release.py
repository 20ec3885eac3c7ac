"""SAELens release names and hf:// paths, resolved, "downloaded" and scored offline.

A real huggingface_hub cache (refs/, blobs/, snapshots/ with relative symlinks, as
``huggingface_hub`` writes it) is built under a temporary HF_HOME and the CLI runs in a
subprocess with HF_HUB_OFFLINE=1, so the resolve -> snapshot_download -> load -> score
path runs for real with no network. The directory of releases is a small YAML file in
SAELens's pretrained_saes.yaml layout, named by DICTBENCH_SAELENS_DIRECTORY.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_subprocess import run_cli
from safetensors.torch import save

from dictbench.errors import UserError
from dictbench.io.formats import hub
from dictbench.score.records import read_records

pytestmark = pytest.mark.usefixtures("torch_one_thread")
D = 32  # the tiny llama's width
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_repo(hf_home: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Files in the layout huggingface_hub's cache uses: content-addressed blobs,
    snapshots/<commit>/<path> symlinks into them, and refs/main naming the commit."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    for rel, data in files.items():
        digest = hashlib.sha256(data).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / COMMIT / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def identity_files(hook_name: str, seed: int) -> dict[str, bytes]:
    """A SAELens 'standard' SAE with x_hat = x exactly (decoder [I; -I])."""
    eye = torch.eye(D)
    tensors = {
        "W_enc": torch.cat([eye, -eye], dim=1),
        "b_enc": torch.zeros(2 * D),
        "W_dec": torch.cat([eye, -eye], dim=0),
        "b_dec": torch.randn(D, generator=torch.Generator().manual_seed(seed)),
    }
    cfg = {
        "architecture": "standard",
        "d_in": D,
        "d_sae": 2 * D,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "metadata": {"hook_name": hook_name, "model_name": "tiny"},
    }
    return {"sae_weights.safetensors": save(tensors), "cfg.json": json.dumps(cfg).encode()}


def zero_gemma_npz() -> bytes:
    """Gemma Scope params.npz whose latents never fire (threshold above any input):
    x_hat = b_dec = 0, i.e. zero ablation, so its delta CE is ce_zero - ce_clean."""
    import io

    buf = io.BytesIO()
    np.savez(
        buf,
        W_enc=np.zeros((D, 8), np.float32),
        W_dec=np.ones((8, D), np.float32),
        b_enc=np.zeros(8, np.float32),
        b_dec=np.zeros(D, np.float32),
        threshold=np.full(8, 1.0, np.float32),
    )
    return buf.getvalue()


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch):
    hf_home = tmp_path / "hf"
    files = {}
    for i, name in enumerate(["a", "b"]):
        for rel, data in identity_files("blocks.1.hook_resid_post", seed=i).items():
            files[f"blocks.1/{name}/{rel}"] = data
    put_repo(hf_home, "testorg/tiny-saes", files)
    put_repo(
        hf_home,
        "testorg/gemma-scope-tiny-res",
        {"layer_1/width_8/average_l0_0/params.npz": zero_gemma_npz()},
    )
    directory = {
        "tiny-release": {
            "repo_id": "testorg/tiny-saes",
            "model": "tiny",
            "saes": [
                {"id": "blocks.1/a", "path": "blocks.1/a"},
                {"id": "blocks.1/b", "path": "blocks.1/b"},
            ],
        },
        "tiny-gemma-scope-res": {
            "repo_id": "testorg/gemma-scope-tiny-res",
            "model": "gemma-2-2b",
            "conversion_func": "gemma_2",
            "saes": [{"id": "layer_1/width_8/canonical", "path": "layer_1/width_8/average_l0_0"}],
        },
        "absent-release": {"repo_id": "nobody/not-cached", "model": "x", "saes": [{"id": "s"}]},
    }
    path = tmp_path / "pretrained_saes.yaml"
    path.write_text(yaml.safe_dump(directory))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(hub.DIRECTORY_ENV, str(path))
    return tmp_path


def dictbench(*args: str, base: Path):
    return run_cli(*args, cache=base / "env", cwd=base, one_thread=True)


def test_release_is_resolved_downloaded_and_scored_offline(fake_hub, tiny_spec_file):
    out = fake_hub / "ev"
    tasks = "sparsity,reconstruction,downstream"
    res = dictbench(
        "eval", "saelens:tiny-release", "--spec", str(tiny_spec_file), "--tasks", tasks,
        "--out", str(out), base=fake_hub,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    recs = read_records(out)
    assert {r["sae_id"] for r in recs} == {"blocks.1-a", "blocks.1-b"}
    for r in recs:
        if r["task"] == "reconstruction":
            assert r["metrics"]["explained_variance"] == pytest.approx(1, abs=1e-6)
        if r["task"] == "downstream":
            assert r["metrics"]["delta_ce"] == pytest.approx(0, abs=1e-5)
    info = json.loads((out / "eval.json").read_text())
    assert len(info["groups"]) == 1  # one hook and model: one shared environment
    for sae in info["saes"]:
        assert f"models--testorg--tiny-saes/snapshots/{COMMIT}/blocks.1/" in sae["path"]
        assert sae["hook"] == "blocks.1.hook_resid_post"


def test_match_and_gemma_scope_release(fake_hub, tiny_spec_file):
    out = fake_hub / "ev-g"
    res = dictbench(
        "eval", "saelens:tiny-release", "saelens:tiny-gemma-scope-res", "--match", "(a|canon.*)$",
        "--spec", str(tiny_spec_file), "--tasks", "downstream", "--out", str(out), base=fake_hub,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    recs = {r["sae_id"]: r["metrics"] for r in read_records(out)}
    assert set(recs) == {"blocks.1-a", "layer_1-width_8-canonical"}
    g = recs["layer_1-width_8-canonical"]
    # no latent fires, so the spliced model is the zero-ablated one
    assert g["ce_sae"] == pytest.approx(g["ce_zero"], rel=1e-6)
    assert g["ce_loss_recovered"] == pytest.approx(0, abs=1e-6)
    info = json.loads((out / "eval.json").read_text())
    by_id = {s["sae_id"]: s for s in info["saes"]}
    assert by_id["layer_1-width_8-canonical"]["format"] == "gemma_scope"
    assert by_id["layer_1-width_8-canonical"]["hook"] == "resid_post.1"  # from the path
    assert by_id["layer_1-width_8-canonical"]["model"] == "google/gemma-2-2b"
    assert "scoring on 'tiny:llama'" in res.stdout  # --spec names the model


def test_hf_path(fake_hub, tiny_spec_file):
    out = fake_hub / "ev-hf"
    res = dictbench(
        "eval", "hf://testorg/tiny-saes/blocks.1/b", "--spec", str(tiny_spec_file),
        "--tasks", "reconstruction", "--out", str(out), base=fake_hub,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    (rec,) = read_records(out)
    assert rec["sae_id"] == "blocks.1-b"
    assert rec["metrics"]["explained_variance"] == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize(
    "source,repo",
    [("saelens:absent-release/s", "nobody/not-cached"), ("hf://other/repo/x", "other/repo/x")],
)
def test_not_cached_offline_is_one_line(fake_hub, source, repo):
    res = dictbench("eval", source, "--out", str(fake_hub / "ev-x"), base=fake_hub)
    assert res.returncode == 2
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(err) == 1, res.stderr
    assert repo in err[0] and "not in the local Hugging Face cache" in err[0]
    assert not (fake_hub / "ev-x").exists()


def test_release_lookup_errors(fake_hub):
    directory = hub.read_directory()
    with pytest.raises(UserError, match="no release 'nope'"):
        hub.release_saes("saelens:nope/x", directory=directory)
    with pytest.raises(UserError, match="has no SAE 'blocks.9/a'"):
        hub.release_saes("saelens:tiny-release/blocks.9/a", directory=directory)
    with pytest.raises(UserError, match="no SAE id in release tiny-release matches 'zzz'"):
        hub.release_saes("saelens:tiny-release", match="zzz", directory=directory)
    (one,) = hub.release_saes("saelens:tiny-release/blocks.1/b", directory=directory)
    assert (one.repo_id, one.path, one.model) == ("testorg/tiny-saes", "blocks.1/b", None)


def test_release_model_becomes_the_default_spec(fake_hub, monkeypatch):
    """With no --spec, a release SAE is scored on the release's model at its hook.
    In-process, so huggingface_hub's settings (read when it was first imported) are
    pointed at the fake cache directly."""
    from huggingface_hub import constants

    from dictbench.evaluate import load_sources, resolve_spec

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(fake_hub / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (sae,) = load_sources(["saelens:tiny-gemma-scope-res"])
    spec, source = resolve_spec(sae)
    assert (spec.model.name, spec.hook) == ("google/gemma-2-2b", "resid_post.1")
    assert "release's model" in source
