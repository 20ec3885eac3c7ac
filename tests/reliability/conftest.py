"""Fixtures of the reliability tests: one fork server for all `dictbench` child runs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from reliability_helpers import CliRunner


@pytest.fixture(scope="session")
def cli() -> Iterator[CliRunner]:
    runner = CliRunner()
    yield runner
    runner.close()
