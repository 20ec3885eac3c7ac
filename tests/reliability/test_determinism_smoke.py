"""The same spec and seed give identical metrics: the `smoke` preset, run twice on CPU.

Two independent `dictbench run --preset smoke` processes on the real embedded
SmolLM2 model, each with its own activation cache and its own Python hash seed (so
an iteration order that depends on string hashing would show up), one torch thread
each. They run side by side on the two cores, which costs about one run's time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_helpers import results_of, weights_of

from dictbench import spec

pytestmark = pytest.mark.slow


def test_smoke_preset_twice_gives_identical_metrics(tmp_path: Path) -> None:
    procs = []
    for name, hash_seed in (("a", "1"), ("b", "2")):
        env = {
            **os.environ,
            "DICTBENCH_CACHE": str(tmp_path / f"cache-{name}"),
            "PYTHONHASHSEED": hash_seed,
            "OMP_NUM_THREADS": "1",
            "TQDM_DISABLE": "1",
            "HF_HUB_OFFLINE": "1",
        }
        argv = [sys.executable, "-m", "dictbench.cli", "run", "--preset", "smoke"]
        argv += ["--out", str(tmp_path / name)]
        procs.append(
            subprocess.Popen(
                argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        assert "activation cache: harvested train" in out  # each computed its own
    a, b = results_of(tmp_path / "a"), results_of(tmp_path / "b")
    tasks = spec.resolve(None, "smoke").tasks
    assert sorted(a) == sorted(f"l1/{t}" for t in ["training", *tasks])
    for key in a:
        assert a[key] == b[key], key  # metrics and details, everything but wall time
    assert weights_of(tmp_path / "a") == weights_of(tmp_path / "b")
    metrics = a["l1/downstream"]["metrics"]  # not vacuous: a trained SAE, real numbers
    assert metrics["ce_clean"] < metrics["ce_sae"] < metrics["ce_zero"]
