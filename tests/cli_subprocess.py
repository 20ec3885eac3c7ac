"""Run the real `dictbench` CLI in a subprocess, the way a user does, for tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_cli(
    *args: str, cache: Path, cwd: Path | None = None, one_thread: bool = False
) -> subprocess.CompletedProcess:
    env = {**os.environ, "DICTBENCH_CACHE": str(cache), "TQDM_DISABLE": "1"}
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "dictbench.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )
