"""Test-only crash points: lets the reliability tests SIGKILL a real run at a chosen moment.

Resuming after a crash can only be tested honestly by crashing a real process at a
known point. Code that can be interrupted calls :func:`point` with a name such as
``train:l1:step=7``; when the environment variable ``DICTBENCH_TEST_KILL_AT`` holds
exactly that name, the process sends itself SIGKILL (no cleanup, no flush, as if the
machine's owner killed it). Without the variable every call is a dictionary lookup
and nothing else, so this is inert in normal use.

Names in use (see tests/reliability/):
- ``harvest:<part>:batch=<i>``   after batch i of a harvest is in the temporary memmap
- ``train:<sae_id>:step=<i>``     before training step i runs
- ``record:<sae_id>/<task>``      after that task's result record is written
- ``sae_done:<sae_id>``           after an SAE is trained and fully scored
- ``write:<path suffix>``         inside an atomic write, after the temporary file is
                                  complete and before it is renamed into place
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ENV = "DICTBENCH_TEST_KILL_AT"


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def point(name: str) -> None:
    """SIGKILL this process if the test harness asked to die at ``name``."""
    target = os.environ.get(ENV)
    if target and target == name:
        _die()


def write_point(path: str | Path) -> None:
    """SIGKILL during an atomic write of a file whose path ends with the requested suffix."""
    target = os.environ.get(ENV)
    if target and target.startswith("write:") and str(path).endswith(target[len("write:") :]):
        _die()
