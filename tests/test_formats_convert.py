"""Foreign SAE formats: files written by hand in each library's documented layout, and
the converted module checked against that library's forward written here in float64
numpy from its documented formulas (tests/test_formats_peers.py checks against the
real packages where they install)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dictbench import cli
from dictbench.errors import UserError
from dictbench.evaluate import load_any
from dictbench.io import formats

D_IN, D_SAE, K = 12, 40, 5


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _x() -> torch.Tensor:
    return 2 * _rand(256, D_IN, seed=99)


def _relu(a: np.ndarray) -> np.ndarray:
    return np.maximum(a, 0.0)


def _topk_rows(g: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(g)
    idx = np.argsort(-g, axis=-1)[:, :k]
    np.put_along_axis(out, idx, np.take_along_axis(g, idx, -1), -1)
    return out


def assert_forward(module: torch.nn.Module, f_ref: np.ndarray, x_hat_ref: np.ndarray) -> None:
    with torch.no_grad():
        f = module.encode(_x())
        x_hat = module.decode(f)
    np.testing.assert_allclose(f.double().numpy(), f_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat.double().numpy(), x_hat_ref, rtol=1e-5, atol=1e-4)
    active = float((f_ref != 0).mean())
    assert 0 < active < 1  # some latents fire and some do not


# --- sparsify ---------------------------------------------------------------------------------


def write_sparsify(folder: Path, **cfg_over) -> dict[str, torch.Tensor]:
    t = {
        "encoder.weight": _rand(D_SAE, D_IN, seed=1),
        "encoder.bias": 0.3 * _rand(D_SAE, seed=2),
        "W_dec": _rand(D_SAE, D_IN, seed=3),
        "b_dec": _rand(D_IN, seed=4),
    }
    folder.mkdir(parents=True)
    save_file(t, str(folder / "sae.safetensors"))
    cfg = {"expansion_factor": 0, "normalize_decoder": True, "num_latents": D_SAE, "k": K}
    cfg.update({"multi_topk": False, "skip_connection": False, "d_in": D_IN, **cfg_over})
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return t


def test_sparsify_is_topk_of_relu_after_centring(tmp_path):
    t = write_sparsify(tmp_path / "layers.2")
    loaded = load_any(tmp_path / "layers.2")
    assert (loaded.fmt, loaded.method, loaded.hook) == ("sparsify", "sparsify-topk", "resid_post.2")
    n = {k: v.double().numpy() for k, v in t.items()}
    x = _x().double().numpy()
    g = _relu((x - n["b_dec"]) @ n["encoder.weight"].T + n["encoder.bias"])
    f = _topk_rows(g, K)
    assert_forward(loaded.module, f, f @ n["W_dec"] + n["b_dec"])


@pytest.mark.parametrize(
    "over,msg",
    [
        ({"skip_connection": True}, "skip connection"),
        ({"transcode": True}, "transcoder"),
        ({"activation": "groupmax"}, "activation 'groupmax'"),
        ({"num_latents": 64}, "give 64 latents but encoder.weight"),
        ({"k": 0}, "'k' must be a positive integer"),
    ],
)
def test_sparsify_refusals(tmp_path, over, msg):
    write_sparsify(tmp_path / "layers.0", **over)
    with pytest.raises(UserError, match=msg):
        load_any(tmp_path / "layers.0")


def test_sparsify_wrong_shape_is_named(tmp_path):
    t = write_sparsify(tmp_path / "layers.0")
    t["b_dec"] = torch.zeros(D_IN + 1)
    save_file(t, str(tmp_path / "layers.0" / "sae.safetensors"))
    with pytest.raises(UserError, match=r"tensor b_dec has shape \(13,\), expected \(12,\)"):
        load_any(tmp_path / "layers.0")


# --- dictionary_learning ---------------------------------------------------------------------


def write_dl(folder: Path, cls: str, state: dict, submodule: str = "resid_post_layer_1") -> None:
    folder.mkdir(parents=True)
    torch.save(state, folder / "ae.pt")
    trainer = {"dict_class": cls, "activation_dim": D_IN, "dict_size": D_SAE}
    trainer.update({"lm_name": "org/model", "submodule_name": submodule, "layer": 1})
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {}}))


def _linear_state(bias_name: str) -> dict[str, torch.Tensor]:
    return {
        "encoder.weight": _rand(D_SAE, D_IN, seed=5),
        "encoder.bias": 0.3 * _rand(D_SAE, seed=6),
        "decoder.weight": _rand(D_IN, D_SAE, seed=7),
        bias_name: _rand(D_IN, seed=8),
    }


def _dl_ref(state: dict, bias: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = {k: v.double().numpy() for k, v in state.items() if v.dim() > 0}
    x = _x().double().numpy()
    g = _relu((x - n[bias]) @ n["encoder.weight"].T + n["encoder.bias"])
    return g, n["decoder.weight"], n[bias]


def test_dl_autoencoder(tmp_path):
    state = _linear_state("bias")
    write_dl(tmp_path / "ae", "AutoEncoder", state)
    loaded = load_any(tmp_path / "ae")
    assert (loaded.fmt, loaded.hook, loaded.model) == (
        "dictionary_learning",
        "resid_post.1",
        "org/model",
    )
    g, dec, b = _dl_ref(state, "bias")
    assert_forward(loaded.module, g, g @ dec.T + b)


def test_dl_topk(tmp_path):
    state = {**_linear_state("b_dec"), "k": torch.tensor(K), "threshold": torch.tensor(-1.0)}
    write_dl(tmp_path / "ae", "AutoEncoderTopK", state)
    g, dec, b = _dl_ref(state, "b_dec")
    f = _topk_rows(g, K)
    assert_forward(load_any(tmp_path / "ae").module, f, f @ dec.T + b)


@pytest.mark.parametrize("threshold", [0.4, -1.0])
def test_dl_batchtopk_uses_its_threshold(tmp_path, threshold):
    state = {**_linear_state("b_dec"), "k": torch.tensor(K), "threshold": torch.tensor(threshold)}
    write_dl(tmp_path / "ae", "BatchTopKSAE", state)
    g, dec, b = _dl_ref(state, "b_dec")
    f = g * (g > threshold)
    assert_forward(load_any(tmp_path / "ae").module, f, f @ dec.T + b)


def test_dl_jumprelu_does_not_centre(tmp_path):
    state = {
        "W_enc": _rand(D_IN, D_SAE, seed=9),
        "b_enc": 0.3 * _rand(D_SAE, seed=10),
        "W_dec": _rand(D_SAE, D_IN, seed=11),
        "b_dec": _rand(D_IN, seed=12),
        "threshold": torch.empty(D_SAE).uniform_(-0.2, 1.0, generator=torch.Generator()),
    }
    write_dl(tmp_path / "ae", "JumpReluAutoEncoder", state, submodule="mlp_out_layer_1")
    loaded = load_any(tmp_path / "ae")
    assert loaded.hook is None and loaded.hook_name == "mlp_out_layer_1"
    n = {k: v.double().numpy() for k, v in state.items()}
    p = _x().double().numpy() @ n["W_enc"] + n["b_enc"]
    f = _relu(p * (p > n["threshold"]))
    assert_forward(loaded.module, f, f @ n["W_dec"] + n["b_dec"])


class Payload:
    """Unpickling this would call os.system; weights_only=True refuses to build it."""

    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_dl_pickle_with_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "ae"
    write_dl(folder, "AutoEncoder", _linear_state("bias"))
    with open(folder / "ae.pt", "wb") as fh:
        pickle.dump({"encoder.weight": Payload()}, fh)
    with pytest.raises(UserError, match="not a plain torch state dict"):
        load_any(folder)
    assert not (tmp_path / "PWNED").exists()


def test_dl_unknown_class(tmp_path):
    write_dl(tmp_path / "ae", "GatedAutoEncoder", _linear_state("bias"))
    with pytest.raises(UserError, match="dict_class 'GatedAutoEncoder' is not supported"):
        load_any(tmp_path / "ae")


# --- Gemma Scope --------------------------------------------------------------------------------


def write_gemma(folder: Path, **over) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    a = {
        "W_enc": rng.standard_normal((D_IN, D_SAE)).astype(np.float32),
        "W_dec": rng.standard_normal((D_SAE, D_IN)).astype(np.float32),
        "b_enc": (0.3 * rng.standard_normal(D_SAE)).astype(np.float32),
        "b_dec": rng.standard_normal(D_IN).astype(np.float32),
        "threshold": rng.uniform(0.0, 1.5, D_SAE).astype(np.float32),
        **over,
    }
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **a)
    return a


def test_gemma_scope_jumprelu_and_hook_from_path(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_7" / "width_16k" / "average_l0_20"
    a = {k: v.astype(np.float64) for k, v in write_gemma(folder).items()}
    loaded = load_any(folder)
    assert (loaded.fmt, loaded.hook, loaded.method) == (
        "gemma_scope",
        "resid_post.7",
        "gemma_scope-jumprelu",
    )
    p = _x().double().numpy() @ a["W_enc"] + a["b_enc"]
    f = _relu(p) * (p > a["threshold"])
    assert_forward(loaded.module, f, f @ a["W_dec"] + a["b_dec"])


def test_gemma_scope_mlp_repository_is_refused(tmp_path, tiny_spec_file):
    from dictbench.evaluate import resolve_spec

    folder = tmp_path / "models--google--gemma-scope-2b-pt-mlp" / "layer_1" / "width_16k" / "x"
    write_gemma(folder)
    loaded = load_any(folder)
    assert loaded.hook is None and loaded.hook_name == "mlp at layer 1 (from the path)"
    with pytest.raises(UserError, match="not a residual-stream point"):
        resolve_spec(loaded, spec_path=str(tiny_spec_file))


def test_gemma_scope_refuses_object_arrays(tmp_path):
    folder = tmp_path / "g"
    write_gemma(folder, threshold=np.array([{"x": 1}], dtype=object))
    with pytest.raises(UserError, match="not a readable .npz of plain arrays"):
        load_any(folder)


def test_gemma_scope_inconsistent_shapes(tmp_path):
    write_gemma(tmp_path / "g", b_enc=np.zeros(D_SAE + 1, np.float32))
    with pytest.raises(UserError, match=r"tensor b_enc has shape \(41,\), expected \(40,\)"):
        load_any(tmp_path / "g")


def test_nan_weights_are_refused(tmp_path):
    w = np.zeros((D_IN, D_SAE), np.float32)
    w[0, 0] = np.nan
    write_gemma(tmp_path / "g", W_enc=w)
    with pytest.raises(UserError, match="W_enc holds NaN"):
        load_any(tmp_path / "g")


# --- detection ------------------------------------------------------------------------------------


def test_unknown_folder_is_one_line_naming_files_and_formats(tmp_path, capsys):
    folder = tmp_path / "mystery"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\x80\x04")
    (folder / "notes.txt").write_text("hi")
    assert cli.main(["eval", str(folder), "--out", str(tmp_path / "ev")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1
    assert "files: notes.txt, weights.bin" in err[0]
    for name in ("SAELens", "sparsify", "dictionary_learning", "Gemma Scope"):
        assert name in err[0]
    assert not (tmp_path / "ev").exists()


def test_folder_of_hookpoint_folders_expands(tmp_path):
    from dictbench.io.formats import sources

    write_sparsify(tmp_path / "run" / "layers.0")
    write_sparsify(tmp_path / "run" / "layers.2")
    (tmp_path / "run" / "notes").mkdir()
    found = sources.expand([str(tmp_path / "run")])
    assert [s.folder.name for s in found] == ["layers.0", "layers.2"]
    assert formats.detect(tmp_path / "run" / "layers.0" / "sae.safetensors")[0] == "sparsify"
