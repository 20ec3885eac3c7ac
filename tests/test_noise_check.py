"""`dictbench check --noise-k`: a change within k seed standard deviations is noise."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from dictbench.cli import main
from dictbench.report import noise_check

sys.path.insert(0, str(Path(__file__).parent))
from run_folders import make_sae, write_run_json  # noqa: E402

REF_EV = [0.80, 0.82, 0.84]  # sample sd 0.02 by hand
SD = 0.02


def _write(run: Path, evs: list[float]) -> Path:
    for seed, ev in enumerate(evs):
        make_sae(run, f"l1-k=1@seed{seed}", "l1", {"l0": 20.0, "explained_variance": ev})
    write_run_json(run)
    return run


@pytest.fixture
def ref(tmp_path) -> Path:
    return _write(tmp_path / "ref", REF_EV)


def test_seed_std_of_the_reference(ref):
    stds = noise_check.seed_stds(ref)
    assert stds[("l1-k=1", "reconstruction", "explained_variance")] == pytest.approx(
        np.std(REF_EV, ddof=1)
    )
    assert stds[("l1-k=1", "reconstruction", "explained_variance")] == pytest.approx(SD)
    assert stds[("l1-k=1", "sparsity", "l0")] == 0.0


def _check(run: Path, ref: Path, *extra: str) -> int:
    # a tolerance far below the seed noise, so only the noise band can excuse a change
    args = ["check", str(run), "--reference", str(ref), "--abs-tol", "explained_variance=0.001"]
    args += ["--rel-tol", "explained_variance=0", *extra]
    return main(args)


def test_one_sd_passes_five_fail(ref, tmp_path, capsys):
    one = _write(tmp_path / "one", [REF_EV[0] - 1 * SD, *REF_EV[1:]])
    five = _write(tmp_path / "five", [REF_EV[0] - 5 * SD, *REF_EV[1:]])
    assert _check(one, ref) == 1  # without the noise band the tolerance alone fails it
    assert _check(one, ref, "--noise-k", "2") == 0
    assert _check(five, ref, "--noise-k", "2") == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out


def test_negative_k_is_bad_input(ref, capsys):
    assert _check(ref, ref, "--noise-k", "-1") == 2
    assert "--noise-k" in capsys.readouterr().err
