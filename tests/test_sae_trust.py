"""A saved SAE naming a class outside dictbench is not imported unless the user says so.

Loading such a folder would import ``module`` from its cfg.json ``module:Class``, which
runs that module's code; a folder downloaded from elsewhere must not be able to do that
silently. Registered baselines load as before.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from dictbench.baselines.l1 import L1SAE, L1Config
from dictbench.errors import UserError
from dictbench.io.sae_io import load_sae, save_sae
from dictbench.io.saelens import export

MODULE = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
from dictbench.baselines.l1 import L1SAE as Inner


class Outside(Inner):
    pass
"""


@pytest.fixture()
def outside_sae(tmp_path, monkeypatch):
    """An l1 SAE folder whose cfg.json names ``outside_mod:Outside``, a module that
    leaves a marker file when imported."""
    marker = tmp_path / "marker"
    (tmp_path / "outside_mod.py").write_text(MODULE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "outside_mod", raising=False)
    sae = L1SAE(L1Config(d_in=4, d_sae=8))
    folder = tmp_path / "sae"
    save_sae(sae, folder, {"hook": "resid_post.0", "model": "tiny"})
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["baseline"] = "outside_mod:Outside"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder, marker, sae


def test_a_class_outside_dictbench_is_refused_without_importing_it(outside_sae, tmp_path):
    folder, marker, _ = outside_sae
    with pytest.raises(UserError, match="--trust-code"):
        load_sae(folder)
    with pytest.raises(UserError, match="outside_mod:Outside"):
        export(folder, tmp_path / "exported")
    assert not marker.exists()  # the module never ran
    assert not (tmp_path / "exported").exists()


def test_trust_code_loads_it(outside_sae):
    folder, marker, original = outside_sae
    sae, cfg = load_sae(folder, trust_code=True)
    assert marker.read_text() == "imported"
    assert type(sae).__name__ == "Outside"
    assert torch.equal(sae.W_dec, original.W_dec)


def test_registered_baselines_need_no_trust(tmp_path):
    sae = L1SAE(L1Config(d_in=4, d_sae=8))
    save_sae(sae, tmp_path / "sae", {})
    loaded, _ = load_sae(tmp_path / "sae")
    assert torch.equal(loaded.W_enc, sae.W_enc)
