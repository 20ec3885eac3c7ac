"""Third-party baselines (bench/registry.py): the ``dictbench.baselines`` entry-point
group and ``module:Class`` references, with the early checks that name what is missing.

The "installed" third-party package is a module file plus a ``.dist-info`` folder in
tmp_path; importlib.metadata finds it because it scans sys.path.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

from dictbench.errors import UserError
from dictbench.registry import baseline_names, get_baseline

VALID_SAE = textwrap.dedent(
    """
    from dataclasses import dataclass

    import torch
    from torch import nn


    @dataclass
    class ThirdConfig:
        d_in: int = 0
        d_sae: int = 0


    class ThirdSAE(nn.Module):
        config_class = ThirdConfig

        def __init__(self, cfg):
            super().__init__()
            self.cfg = cfg
            self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))
            self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in))

        def encode(self, x):
            return torch.relu(x @ self.W_enc)

        def decode(self, f):
            return f @ self.W_dec

        def forward(self, x):
            return self.decode(self.encode(x))

        def loss(self, batch, step):
            raise NotImplementedError
    """
)

BROKEN_SAES = textwrap.dedent(
    """
    from dataclasses import dataclass

    from torch import nn


    @dataclass
    class Cfg:
        d_in: int = 0
        d_sae: int = 0


    class NoLoss(nn.Module):
        config_class = Cfg

        def encode(self, x):
            return x

        def decode(self, f):
            return f

        def forward(self, x):
            return x


    class NoConfig(nn.Module):
        def encode(self, x):
            return x

        def decode(self, f):
            return f

        def forward(self, x):
            return x

        def loss(self, batch, step):
            return None


    def a_function():
        return None


    an_instance = NoLoss()
    """
)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """tmp_path on sys.path; modules imported from it are forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("thirdparty_sae", "broken_saes"):
        sys.modules.pop(name, None)


def install_thirdparty(folder) -> None:
    (folder / "thirdparty_sae.py").write_text(VALID_SAE)
    dist = folder / "thirdparty_sae-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-sae\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[dictbench.baselines]\nthirdsae = thirdparty_sae:ThirdSAE\n"
    )


def test_entry_point_baseline_is_found_and_listed(site):
    assert "thirdsae" not in baseline_names()
    install_thirdparty(site)

    names = baseline_names()
    assert "thirdsae" in names
    assert {"l1", "e2e", "e2e_ds"} <= set(names)  # built-ins are still listed
    assert names == sorted(names)

    cls = get_baseline("thirdsae")
    assert cls.__name__ == "ThirdSAE"
    assert cls.__module__ == "thirdparty_sae"
    sae = cls(cls.config_class(d_in=4, d_sae=8))
    assert tuple(sae.W_dec.shape) == (8, 4)


def test_unknown_name_lists_the_entry_point_baselines(site):
    install_thirdparty(site)
    with pytest.raises(UserError, match=r"unknown baseline 'nope'.*thirdsae"):
        get_baseline("nope")


def test_module_class_reference_to_the_valid_class(site):
    (site / "thirdparty_sae.py").write_text(VALID_SAE)
    assert get_baseline("thirdparty_sae:ThirdSAE").__name__ == "ThirdSAE"


@pytest.mark.parametrize(
    "attr, message",
    [
        ("NoLoss", r"missing required method\(s\): loss"),
        ("NoConfig", r"no 'config_class'"),
        ("a_function", r"is not a class"),
        ("an_instance", r"is not a class"),
    ],
)
def test_module_class_reference_checks_name_what_is_wrong(site, attr, message):
    (site / "broken_saes.py").write_text(BROKEN_SAES)
    with pytest.raises(UserError, match=message) as info:
        get_baseline(f"broken_saes:{attr}")
    assert f"broken_saes:{attr}" in str(info.value)
