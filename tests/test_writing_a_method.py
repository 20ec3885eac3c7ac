"""docs/writing-a-method.md's example class, kept true: the page shows the file verbatim,
the harness accepts it as `module:Class`, `--set baselines.0...` reaches a method given
with `--baseline`, training through `dictbench run` gives exactly k active latents at
most, and its own `saelens_export` makes it exportable although it lives outside
dictbench."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from dictbench import cli, registry, spec
from dictbench.errors import SpecError, UserError
from dictbench.io import saelens

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "examples" / "my_sae.py"
PAGE = ROOT / "docs" / "writing-a-method.md"


@pytest.fixture
def example_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))


def test_the_page_shows_the_example_verbatim():
    assert EXAMPLE.read_text() in PAGE.read_text()


def test_the_example_passes_the_class_check(example_on_path):
    cls = registry.get_baseline("my_sae:MySAE")
    assert cls.sparsity_knob in cls.config_class.field_names()
    assert registry.missing_for_budget(cls, normalize_activations=True) is None


def test_set_reaches_baselines_given_with_baseline(example_on_path, tiny_spec_data, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_spec_data))
    resolved = spec.resolve(str(path), None, ["baselines.0.params.k=3"], ["my_sae:MySAE"])
    assert [(b.method, b.params) for b in resolved.baselines] == [("my_sae:MySAE", {"k": 3})]
    # The preset's l1 is gone: its knob is no longer a valid override target.
    with pytest.raises(SpecError, match=r"baselines\[0\]\.params\.l1_coefficient"):
        spec.resolve(str(path), None, ["baselines.0.params.l1_coefficient=2"], ["my_sae:MySAE"])


def test_fold_input_scale_makes_it_act_on_raw_inputs(example_on_path):
    cls = registry.get_baseline("my_sae:MySAE")
    torch.manual_seed(0)
    sae = cls(cls.config_class(d_in=8, d_sae=32, k=4))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x, s = torch.randn(64, 8), 2.5
    want_f, want_xhat = sae.encode(s * x), sae.decode(sae.encode(s * x)) / s
    sae.fold_input_scale(s)
    torch.testing.assert_close(sae.encode(x), want_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x), want_xhat, rtol=1e-5, atol=1e-5)


def test_baseline_without_fold_input_scale_names_the_budget_setting():
    class NoFold(torch.nn.Module):
        pass

    from dictbench.baselines.base import Baseline

    lacking = registry.missing_for_budget(Baseline, normalize_activations=True)
    assert lacking is not None and "budget.normalize_activations: false" in lacking
    assert registry.missing_for_budget(Baseline, normalize_activations=False) is None
    assert registry.missing_for_budget(NoFold, normalize_activations=True) is not None


def test_a_class_without_cfg_or_w_dec_is_refused_before_training(example_on_path):
    import my_sae

    class NoCfg(my_sae.MySAE):
        def __init__(self, cfg):
            super().__init__(cfg)
            del self.cfg

    class NoDecoder(my_sae.MySAE):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.W_dec = torch.nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))  # transposed

    with pytest.raises(UserError, match="self.cfg"):
        registry.check_baseline_class(NoCfg, "m:NoCfg")
    with pytest.raises(UserError, match=r"W_dec tensor of shape \[d_sae, d_in\]"):
        registry.check_baseline_class(NoDecoder, "m:NoDecoder")


def test_train_with_run_then_export(example_on_path, tiny_spec_data, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**tiny_spec_data, "tasks": ["sparsity", "reconstruction"]}))
    out = tmp_path / "run"
    args = ["run", str(path), "--baseline", "my_sae:MySAE", "--set", "baselines.0.params.k=3"]
    assert cli.main([*args, "--out", str(out)]) == 0
    (sae_dir,) = sorted((out / "saes").iterdir())
    sparsity = json.loads((out / "results" / sae_dir.name / "sparsity.json").read_text())
    assert 0 < sparsity["metrics"]["l0"] <= 3  # TopK with k = 3 keeps at most 3 per token
    assert sparsity["metric_meta"]["l0"]["direction"] == "lower"
    exported = saelens.export(sae_dir, tmp_path / "exported", trust_code=True)
    module, info = saelens.load_saelens(exported)
    assert (info.architecture, info.k) == ("topk", 3)
    from dictbench.io.sae_io import load_sae

    ours, _ = load_sae(sae_dir, trust_code=True)
    x = torch.randn(32, ours.cfg.d_in)
    with torch.no_grad():
        assert torch.equal(ours.encode(x), module.encode(x))
