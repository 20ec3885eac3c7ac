"""SAELens interop: export then import is exact; SAELens folders compute SAELens's formula.

The SAELens forward pass is recomputed here in float64 numpy from the formulas in
SAELens's source (standard, gated, topk, jumprelu), not by calling dictbench.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dictbench import cli, registry
from dictbench.baselines.l1 import L1SAE
from dictbench.errors import UserError
from dictbench.io import saelens
from dictbench.io.sae_io import CONFIG, WEIGHTS, save_sae

D_IN, D_SAE = 16, 48

# baseline -> (SAELens architecture, apply_b_dec_to_input)
EXPORTS = {
    "l1": ("standard", True),
    "l1_april": ("standard", False),
    "e2e": ("standard", False),
    "e2e_ds": ("standard", False),
    "gated": ("gated", True),
    "topk": ("topk", True),
    "batchtopk": ("jumprelu", True),
    "jumprelu": ("jumprelu", True),
}
SAELENS_TENSORS = {
    "standard": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "topk": {"W_enc", "b_enc", "W_dec", "b_dec"},
    "jumprelu": {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"},
    "gated": {"W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"},
}


def random_sae(name: str, seed: int = 0) -> torch.nn.Module:
    """A baseline with every parameter moved off its init, so no term is trivially zero."""
    cls = registry.get_baseline(name)
    extra = {"k": 5} if name in ("topk", "batchtopk") else {}
    torch.manual_seed(seed)
    sae = cls(cls.config_class(d_in=D_IN, d_sae=D_SAE, **extra))
    with torch.no_grad():
        for _, p in sae.named_parameters():
            p.add_(0.3 * torch.randn_like(p))
        if name == "batchtopk":
            sae.threshold.fill_(0.4)
        if name == "jumprelu":
            sae.log_threshold.copy_(torch.empty(D_SAE).uniform_(0.05, 0.8).log())
    return sae.eval()


def save_ours(sae: torch.nn.Module, folder: Path, hook: str = "resid_post.2") -> Path:
    save_sae(sae, folder, {"sae_id": folder.name, "hook": hook, "model": "tiny:llama"})
    return folder


# --- dictbench -> SAELens -> dictbench ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPORTS))
def test_export_then_import_gives_identical_outputs(tmp_path, name):
    sae = random_sae(name)
    out = saelens.export(save_ours(sae, tmp_path / name), tmp_path / "exported")

    cfg = json.loads((out / CONFIG).read_text())
    arch, centred = EXPORTS[name]
    assert cfg["architecture"] == arch
    assert cfg["apply_b_dec_to_input"] is centred
    assert (cfg["hook_name"], cfg["hook_layer"]) == ("blocks.2.hook_resid_post", 2)
    assert (cfg["d_in"], cfg["d_sae"]) == (D_IN, D_SAE)
    assert cfg["normalize_activations"] == "none"
    assert cfg["dictbench"]["baseline"] == name
    if arch == "topk":  # both spellings: SAELens 5 (activation kwargs) and 6 (top-level k)
        assert cfg["k"] == cfg["activation_fn_kwargs"]["k"] == 5
    # exactly SAELens's tensor names, so SAELens's strict load_state_dict accepts the file
    assert set(load_file(str(out / WEIGHTS))) == SAELENS_TENSORS[arch]

    module, info = saelens.load_saelens(out)
    assert (info.architecture, info.hook) == (arch, "resid_post.2")
    x = 3 * torch.randn(512, D_IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        f_ours, f_back = sae.encode(x), module.encode(x)
        assert torch.equal(f_ours, f_back)
        assert torch.equal(sae.decode(f_ours), module.decode(f_back))
        assert torch.equal(sae(x), module(x))
    active = float((f_ours != 0).float().mean())
    assert 0 < active < 1  # some latents fire and some do not: the comparison has teeth


class Renamed(L1SAE):
    """A third-party subclass: same parameters, its own encode, so not exportable as-is."""

    name = "renamed"

    def encode(self, x):
        return torch.sigmoid(x @ self.W_enc)


def test_unexportable_baseline_is_refused():
    sae = Renamed(L1SAE.config_class(d_in=D_IN, d_sae=D_SAE))
    with pytest.raises(UserError, match="has no SAELens equivalent; exportable: batchtopk"):
        saelens.to_saelens(sae)


def test_export_command(tmp_path, capsys):
    src = save_ours(random_sae("gated"), tmp_path / "gated")
    out = tmp_path / "gated-saelens"
    assert cli.main(["export", str(src), "--format", "saelens", str(out)]) == 0
    assert (out / WEIGHTS).is_file() and (out / CONFIG).is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    # a second export onto the same folder is refused, and leaves it alone
    before = (out / WEIGHTS).read_bytes()
    capsys.readouterr()
    assert cli.main(["export", str(src), "--format", "saelens", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]
    assert (out / WEIGHTS).read_bytes() == before


# --- SAELens folders as SAELens writes them --------------------------------------------------


def _relu(a: np.ndarray) -> np.ndarray:
    return np.maximum(a, 0.0)


def saelens_forward(arch, t, x, centre=True, k=None, rescale=False):
    """SAELens's inference forward pass in float64, written from its source."""
    t = {n: v.double().numpy() for n, v in t.items()}
    x = x.double().numpy()
    xc = x - t["b_dec"] if centre else x
    if arch == "gated":
        gate = (xc @ t["W_enc"] + t["b_gate"]) > 0
        f = gate * _relu(xc @ (t["W_enc"] * np.exp(t["r_mag"])) + t["b_mag"])
    else:
        pre = xc @ t["W_enc"] + t["b_enc"]
        if arch == "standard":
            f = _relu(pre)
        elif arch == "jumprelu":
            f = np.where(pre > _relu(t["threshold"]), _relu(pre), 0.0)
        else:
            norms = np.linalg.norm(t["W_dec"], axis=-1)
            if rescale:
                pre = pre * norms
            f = np.zeros_like(pre)
            top = np.argsort(-pre, axis=-1)[:, :k]
            np.put_along_axis(f, top, _relu(np.take_along_axis(pre, top, -1)), -1)
    g = f / np.linalg.norm(t["W_dec"], axis=-1) if (arch == "topk" and rescale) else f
    return f, g @ t["W_dec"] + t["b_dec"]


def saelens_tensors(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "W_enc": (D_IN, D_SAE),
        "W_dec": (D_SAE, D_IN),
        "b_dec": (D_IN,),
        "b_enc": (D_SAE,),
        "b_gate": (D_SAE,),
        "b_mag": (D_SAE,),
        "r_mag": (D_SAE,),
        "threshold": (D_SAE,),
    }
    out = {n: 0.3 * torch.randn(shapes[n], generator=g) for n in sorted(SAELENS_TENSORS[arch])}
    if arch == "jumprelu":  # a few negative thresholds: SAELens 6 clamps them at 0
        out["threshold"] = torch.rand(D_SAE, generator=g) * 0.8 - 0.1
    return out


def v6_cfg(arch: str, **fields) -> dict:
    """cfg.json as SAELens 6's save_model writes it."""
    return {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.54.12",
            "sae_lens_training_version": "6.54.12",
            "model_name": "gpt2",
            "hook_name": "blocks.1.hook_resid_post",
            "context_size": 128,
        },
        **fields,
        "architecture": arch,
    }


def v5_cfg(arch: str, **fields) -> dict:
    """cfg.json as SAELens 5's SAEConfig.to_dict writes it."""
    return {
        "architecture": arch,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "gpt2",
        "hook_name": "blocks.1.hook_resid_post",
        "hook_layer": 1,
        "hook_head_index": None,
        "activation_fn_str": "relu",
        "activation_fn_kwargs": {},
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": "5.11.0",
        "prepend_bos": True,
        "dataset_path": "Skylion007/openwebtext",
        "dataset_trust_remote_code": True,
        "context_size": 128,
        "normalize_activations": "none",
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
        "seqpos_slice": [None],
        **fields,
    }


def write_saelens(folder: Path, tensors: dict, cfg: dict) -> Path:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(cfg))
    return folder


HAND_BUILT = {
    # id: (architecture, cfg, centre, k, rescale)
    "v6-standard": ("standard", v6_cfg("standard"), True, None, False),
    "v6-gated": ("gated", v6_cfg("gated"), True, None, False),
    "v6-topk-rescaled": (
        "topk",
        v6_cfg("topk", k=6, rescale_acts_by_decoder_norm=True),
        True,
        6,
        True,
    ),
    "v6-jumprelu-uncentred": (
        "jumprelu",
        v6_cfg("jumprelu", apply_b_dec_to_input=False),
        False,
        None,
        False,
    ),
    "v5-standard-uncentred": (
        "standard",
        v5_cfg("standard", apply_b_dec_to_input=False),
        False,
        None,
        False,
    ),
    # SAELens 5's TopK spelling: a standard SAE whose activation is topk
    "v5-topk-as-standard": (
        "topk",
        v5_cfg("standard", activation_fn_str="topk", activation_fn_kwargs={"k": 4}),
        True,
        4,
        False,
    ),
    "v5-jumprelu": ("jumprelu", v5_cfg("jumprelu"), True, None, False),
    "v5-gated": ("gated", v5_cfg("gated"), True, None, False),
}


@pytest.mark.parametrize("case", sorted(HAND_BUILT))
def test_saelens_folder_computes_saelens_forward(tmp_path, case):
    arch, cfg, centre, k, rescale = HAND_BUILT[case]
    tensors = saelens_tensors(arch)
    folder = write_saelens(tmp_path / case, tensors, cfg)
    module, info = saelens.load_saelens(folder)
    assert (info.architecture, info.hook, info.model_name) == (arch, "resid_post.1", "gpt2")

    x = 2 * torch.randn(400, D_IN, generator=torch.Generator().manual_seed(7))
    f_ref, x_hat_ref = saelens_forward(arch, tensors, x, centre, k, rescale)
    with torch.no_grad():
        f, x_hat = module.encode(x), module.decode(module.encode(x))
    np.testing.assert_allclose(f.double().numpy(), f_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_hat.double().numpy(), x_hat_ref, rtol=1e-5, atol=1e-5)
    assert 0 < (f_ref != 0).mean() < 1
    if arch == "topk":
        assert (f_ref != 0).sum(-1).max() <= k


def test_jumprelu_negative_threshold_acts_as_relu(tmp_path):
    """SAELens 6 compares with ReLU(threshold): a negative threshold is a plain ReLU."""
    tensors = saelens_tensors("jumprelu")
    tensors["threshold"] = torch.full((D_SAE,), -5.0)
    module, _ = saelens.load_saelens(write_saelens(tmp_path / "j", tensors, v6_cfg("jumprelu")))
    x = torch.randn(64, D_IN)
    pre = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    assert torch.allclose(module.encode(x), torch.relu(pre), atol=1e-6)


def test_v5_finetuning_scaling_factor_scales_latents_before_decoding(tmp_path):
    tensors = saelens_tensors("standard")
    scale = torch.rand(D_SAE) + 0.5
    folder = write_saelens(
        tmp_path / "s",
        {**tensors, "scaling_factor": scale},
        v5_cfg("standard", finetuning_scaling_factor=True),
    )
    module, _ = saelens.load_saelens(folder)
    x = torch.randn(64, D_IN)
    f = module.encode(x)
    expected = (f * scale) @ tensors["W_dec"] + tensors["b_dec"]
    assert torch.allclose(module.decode(f), expected, atol=1e-6)


# --- bad folders: one line, nothing unpickled ---------------------------------------------------


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_tensor_is_one_line(tmp_path):
    tensors = saelens_tensors("standard")
    del tensors["b_enc"]
    folder = write_saelens(tmp_path / "m", tensors, v6_cfg("standard"))
    with pytest.raises(UserError) as err:
        saelens.load_saelens(folder)
    assert "missing tensor(s) b_enc for a standard SAE" in _one_line(err)


def test_wrong_shape_is_one_line(tmp_path):
    tensors = saelens_tensors("jumprelu")
    tensors["W_enc"] = tensors["W_enc"].t()
    folder = write_saelens(tmp_path / "w", tensors, v5_cfg("jumprelu"))
    with pytest.raises(UserError) as err:
        saelens.load_saelens(folder)
    msg = _one_line(err)
    assert f"tensor W_enc has shape ({D_SAE}, {D_IN}), expected ({D_IN}, {D_SAE})" in msg


def test_unexpected_tensor_is_refused(tmp_path):
    tensors = {**saelens_tensors("standard"), "b_gate": torch.zeros(D_SAE)}
    folder = write_saelens(tmp_path / "u", tensors, v6_cfg("standard"))
    with pytest.raises(UserError, match="unexpected tensor"):
        saelens.load_saelens(folder)


@pytest.mark.parametrize(
    "cfg,named",
    [
        (v6_cfg("standard", normalize_activations="expected_average_only_in"), "normalize"),
        (v6_cfg("standard", normalize_activations="layer_norm"), "normalize"),
        (v6_cfg("matching_pursuit"), "matching_pursuit"),
        (v5_cfg("standard", activation_fn_str="tanh-relu"), "tanh-relu"),
        (v5_cfg("standard", hook_head_index=3), "hook_head_index"),
        (v6_cfg("topk"), "k"),
        (dict(v6_cfg("standard"), d_in="16"), "d_in"),
    ],
    ids=["unfolded-norm", "layer-norm", "architecture", "activation", "head", "no-k", "d_in"],
)
def test_unsupported_configs_are_refused(tmp_path, cfg, named):
    arch = cfg.get("architecture") if cfg.get("architecture") in SAELENS_TENSORS else "standard"
    folder = write_saelens(tmp_path / "c", saelens_tensors(arch), cfg)
    with pytest.raises(UserError) as err:
        saelens.load_saelens(folder)
    assert named in _one_line(err)


class _Payload:
    """Unpickling this creates ``path``: proof of whether a loader unpickled it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_pickle_named_sae_weights_is_refused_and_never_unpickled(tmp_path):
    live = tmp_path / "live-marker"
    pickle.loads(pickle.dumps(_Payload(live)))
    assert live.exists()  # the payload really runs code when unpickled

    marker = tmp_path / "marker"
    folder = tmp_path / "sae"
    folder.mkdir()
    (folder / WEIGHTS).write_bytes(pickle.dumps({"W_enc": _Payload(marker)}))
    (folder / CONFIG).write_text(json.dumps(v6_cfg("standard")))
    with pytest.raises(UserError) as err:
        saelens.load_saelens(folder)
    assert "pickle" in _one_line(err) and "unpickling can run code" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["sae.pt", "sae.pth", "model.bin", "sae.ckpt", "sae.pkl"])
def test_pickle_files_are_refused_by_name(tmp_path, name):
    path = tmp_path / name
    torch.save({"W_enc": torch.zeros(2)}, path)
    with pytest.raises(UserError, match="pickle-based checkpoint"):
        saelens.load_saelens(path)
    # a folder holding only such a file is refused naming it
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        saelens.load_saelens(tmp_path)


def test_torch_save_under_the_safetensors_name_is_refused(tmp_path):
    folder = tmp_path / "sae"
    folder.mkdir()
    torch.save(saelens_tensors("standard"), folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps(v6_cfg("standard")))
    with pytest.raises(UserError, match="pickle-based checkpoint"):
        saelens.load_saelens(folder)


# --- the real SAELens, when installed (not a dependency; `pip install sae-lens`) ----------


def test_real_saelens_loads_our_exports(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    version = int(sae_lens.__version__.split(".")[0])
    for name in sorted(EXPORTS):
        sae = random_sae(name)
        out = saelens.export(save_ours(sae, tmp_path / name), tmp_path / f"{name}-sl")
        if version >= 6:
            theirs = sae_lens.SAE.load_from_disk(str(out))
        else:
            theirs = sae_lens.SAE.load_from_pretrained(str(out))
        x = torch.randn(128, D_IN)
        with torch.no_grad():
            f = sae.encode(x)
            assert torch.allclose(theirs.encode(x), f, atol=1e-6), name
            assert torch.allclose(theirs.decode(f), sae.decode(f), atol=1e-5), name


def test_saelens_saved_folders_load_with_identical_outputs(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    if int(sae_lens.__version__.split(".")[0]) < 6:
        pytest.skip("builds SAEs with the SAELens 6 classes")
    makers = {
        "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
        "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig, {}),
        "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 6}),
        "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
    }
    for arch, (cls, cfg_cls, extra) in makers.items():
        theirs = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **extra))
        with torch.no_grad():
            for _, p in theirs.named_parameters():
                p.copy_(0.3 * torch.randn_like(p))
        theirs.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
        theirs.save_model(str(tmp_path / arch))
        mine, info = saelens.load_saelens(tmp_path / arch)
        assert (info.architecture, info.hook) == (arch, "resid_post.1")
        x = torch.randn(128, D_IN)
        with torch.no_grad():
            f = theirs.encode(x)
            assert torch.allclose(mine.encode(x), f, atol=1e-6), arch
            assert torch.allclose(mine.decode(f), theirs.decode(f), atol=1e-5), arch


def test_hook_names_round_trip():
    for hook in ("resid_pre.0", "resid_post.11"):
        assert saelens.from_tl_hook(saelens.to_tl_hook(hook)[0]) == hook
    assert saelens.from_tl_hook("blocks.3.hook_mlp_out") is None
    assert saelens.stream_position("resid_post.4") == saelens.stream_position("resid_pre.5")
