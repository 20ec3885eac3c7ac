"""Converters against the real libraries: each library saves an SAE with its own code,
dictbench loads the folder, and both forwards agree on random inputs.

The libraries are test-only peers (install into .venv-bench: ``pip install -c
<torch pin> eai-sparsify`` and ``pip install --no-deps dictionary_learning``); where
one is missing its tests skip with one line.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest
import torch

from dictbench.evaluate import load_any

D_IN, D_SAE, K = 16, 64, 6


def _need(module: str, pip_name: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{pip_name} is not installed here (a test-only peer; see .venv-bench)")


def _x(seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(512, D_IN, generator=torch.Generator().manual_seed(seed))


def _perturbed(module: torch.nn.Module, seed: int = 1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))


def _dense(acts: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.zeros(acts.shape[0], D_SAE).scatter(-1, idx, acts)


def test_sparsify_save_to_disk_loads_with_the_same_forward(tmp_path):
    _need("sparsify", "eai-sparsify")
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K))
    _perturbed(sae)
    sae.save_to_disk(tmp_path / "layers.4")
    loaded = load_any(tmp_path / "layers.4")
    assert loaded.hook == "resid_post.4"
    x = _x()
    with torch.no_grad():
        top_acts, top_idx, _ = sae.encode(x)
        want_f = _dense(top_acts, top_idx)
        want_x_hat = sae.decode(top_acts, top_idx)
        f = loaded.module.encode(x)
        x_hat = loaded.module.decode(f)
    assert torch.allclose(f, want_f, atol=1e-5, rtol=1e-5)
    assert torch.allclose(x_hat, want_x_hat, atol=1e-4, rtol=1e-5)
    assert int((f != 0).sum(-1).max()) == K


@pytest.fixture()
def dl(monkeypatch):
    """dictionary_learning imports nnsight at package import, only for its activation
    buffer; a stand-in module lets the dictionary classes import without it."""
    _need("dictionary_learning", "dictionary_learning")
    if importlib.util.find_spec("nnsight") is None:
        stub = types.ModuleType("nnsight")
        stub.LanguageModel = object
        monkeypatch.setitem(sys.modules, "nnsight", stub)
    for name in ("wandb",):
        if importlib.util.find_spec(name) is None:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    import dictionary_learning.dictionary as dictionary

    try:
        from dictionary_learning.trainers import batch_top_k, top_k
    except ImportError as e:
        pytest.skip(f"dictionary_learning trainers do not import here ({e})")
    return {
        "AutoEncoder": lambda: dictionary.AutoEncoder(D_IN, D_SAE),
        "JumpReluAutoEncoder": lambda: dictionary.JumpReluAutoEncoder(D_IN, D_SAE),
        "AutoEncoderTopK": lambda: top_k.AutoEncoderTopK(D_IN, D_SAE, K),
        "BatchTopKSAE": lambda: batch_top_k.BatchTopKSAE(D_IN, D_SAE, K),
    }


@pytest.mark.parametrize(
    "cls", ["AutoEncoder", "JumpReluAutoEncoder", "AutoEncoderTopK", "BatchTopKSAE"]
)
def test_dictionary_learning_state_dict_loads_with_the_same_forward(tmp_path, dl, cls):
    ae = dl[cls]()
    _perturbed(ae)
    if cls == "BatchTopKSAE":
        ae.threshold.fill_(0.5)
    if cls == "JumpReluAutoEncoder":
        with torch.no_grad():
            ae.threshold.copy_(torch.rand(D_SAE, generator=torch.Generator().manual_seed(2)))
    folder = tmp_path / "trainer_0"
    folder.mkdir()
    torch.save(ae.state_dict(), folder / "ae.pt")
    trainer = {"dict_class": cls, "activation_dim": D_IN, "dict_size": D_SAE, "layer": 3}
    trainer.update({"lm_name": "EleutherAI/pythia-70m-deduped", "submodule_name": "x"})
    (folder / "config.json").write_text(json.dumps({"trainer": trainer}))
    loaded = load_any(folder)
    x = _x(1)
    with torch.no_grad():
        want_f = ae.encode(x)
        f = loaded.module.encode(x)
        x_hat = loaded.module.decode(f)
        want_x_hat = ae.decode(want_f)
    assert torch.allclose(f, want_f, atol=1e-5, rtol=1e-5)
    assert torch.allclose(x_hat, want_x_hat, atol=1e-4, rtol=1e-5)
    active = float((want_f != 0).float().mean())
    assert 0 < active < 1
