"""Progress lines and the output folder check, shared by ``dictbench run`` and ``dictbench eval``.

Why one function: every command reports progress the same way (a whole line, flushed
at once, because runs are watched live and often piped to a file), and in a
data-parallel run only rank 0 speaks, for all; outside one every process is rank 0.
"""

from __future__ import annotations

import os
from pathlib import Path

from dictbench.errors import UserError
from dictbench.train import distributed


def log(msg: str) -> None:
    """Print one progress line now (rank 0 only in a data-parallel run)."""
    if distributed.is_main():
        print(msg, flush=True)


def check_writable(out: Path) -> None:
    """Refuse an ``--out`` folder that cannot be created or written, in one line,
    before any model is loaded or anything computed. Rank 0 alone writes there."""
    if not distributed.is_main():
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out: cannot write to '{out}' ({e.strerror})") from e
