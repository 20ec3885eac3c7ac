"""``synthetic.generator: synthsaebench`` (bench/data/synthsaebench.py): refused in one line
without sae-lens; with it, SynthSAEBench's data through SAELens, checked against the
generator's own structure (the answer key writes x; children fire only under their
parent, at most one sibling at a time) and for reproducibility."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from dictbench import cli
from dictbench import spec as spec_mod
from dictbench.data.synthetic import SyntheticSpec, make_stores
from dictbench.data.synthsaebench import SynthSAEBenchSpec
from dictbench.errors import SpecError

pytestmark = pytest.mark.usefixtures("torch_one_thread")

HAVE_SAE_LENS = importlib.util.find_spec("sae_lens") is not None


def small_spec(**over) -> SyntheticSpec:
    """85 hierarchical features (one tree, branching 4, depth 3) of 128, in 16 dims."""
    s = SynthSAEBenchSpec(hierarchy_roots=1, ortho_steps=5, **over)
    return SyntheticSpec(d_in=16, n_features=128, generator="synthsaebench", synthsaebench=s)


def test_dictbench_generator_keeps_its_identity():
    # The fingerprints of existing synthetic runs (and check-synthetic's reference) must
    # not change because the option exists.
    ident = SyntheticSpec().identity()["synthetic"]
    assert "generator" not in ident and "synthsaebench" not in ident


def test_unknown_generator_is_a_one_line_spec_error():
    with pytest.raises(SpecError, match=r"synthetic\.generator: unknown 'nope'"):
        SyntheticSpec(generator="nope").validate()


def test_hierarchy_larger_than_the_features_is_refused():
    s = SyntheticSpec(
        d_in=16, n_features=100, generator="synthsaebench", synthsaebench=SynthSAEBenchSpec()
    )
    with pytest.raises(SpecError, match="128 trees of 85 features need 10880"):
        s.validate()


@pytest.mark.skipif(HAVE_SAE_LENS, reason="sae-lens is installed here")
def test_without_sae_lens_the_preset_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    spec = spec_mod.resolve(preset="synthsaebench-cpu")  # a valid spec without sae-lens
    with pytest.raises(SpecError) as err:
        make_stores(spec.synthetic, 0, 1024, 512)
    msg = str(err.value)
    assert "\n" not in msg and "pip install 'dictbench[synthsaebench]'" in msg
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "--preset", "synthsaebench-cpu", "--out", "x"]) == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err_lines) == 1 and "dictbench[synthsaebench]" in err_lines[0]
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_the_cpu_preset_resolves():
    s = spec_mod.resolve(preset="synthsaebench-cpu")
    assert s.synthetic.generator == "synthsaebench"
    assert (s.synthetic.n_features, s.synthetic.d_in, s.budget.d_sae) == (1024, 48, 256)


@pytest.fixture(scope="module")
def generated():
    pytest.importorskip("sae_lens")
    spec = small_spec()
    return spec, make_stores(spec, 0, 1024, 512)


def test_answer_key_writes_the_activations(generated):
    spec, (train, ev, truth) = generated
    assert train.acts.shape == (8, 128, 16) and ev.acts.shape == (4, 128, 16)
    d = truth.features.astype(np.float64)
    assert np.allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-6)
    c = truth.coefficients.dense(0, truth.coefficients.n_tokens).astype(np.float64)
    x = ev.acts.reshape(-1, 16).astype(np.float64)
    residual = x - c @ d  # the generator's constant bias, norm 0.5
    assert np.allclose(residual, residual[0], atol=1e-4)
    assert np.linalg.norm(residual[0]) == pytest.approx(0.5, abs=1e-4)
    assert truth.noise_std == 0.0
    assert 0 < (c > 0).sum(1).mean() < 128


def test_children_fire_only_under_their_parent_and_exclusively(generated):
    from dictbench.data import synthsaebench

    spec, (_, _, truth) = generated
    model = synthsaebench.build_model(spec)
    on = truth.coefficients.dense(0, truth.coefficients.n_tokens) > 0
    parents = 0
    stack = list(model.hierarchy.roots)
    while stack:
        node = stack.pop()
        kids = [k for k in node.children if k.feature_index is not None]
        stack.extend(node.children)
        if node.feature_index is None or not kids:
            continue
        parents += 1
        child_on = on[:, [k.feature_index for k in kids]]
        assert not (child_on.any(1) & ~on[:, node.feature_index]).any()
        assert (child_on.sum(1) <= 1).all()  # mutually_exclusive_portion 1.0
    assert parents == 1 + 4 + 16  # every non-leaf node of the tree was checked


def test_generation_is_reproducible_and_splits_differ(generated):
    spec, (train, ev, truth) = generated
    train2, ev2, truth2 = make_stores(small_spec(), 0, 1024, 512)
    assert np.array_equal(train.acts, train2.acts) and np.array_equal(ev.acts, ev2.acts)
    assert np.array_equal(truth.coefficients.values, truth2.coefficients.values)
    assert train.meta["fingerprint"] == train2.meta["fingerprint"]
    assert not np.array_equal(train.acts[:4], ev.acts)
    other, _, _ = make_stores(small_spec(), 1, 1024, 512)
    assert not np.array_equal(other.acts, train.acts)
