"""One writer per run folder: a second `dictbench run` on the same --out is refused.

Two runs writing the same records would interleave results from different
processes, and a resume racing a live run would train the same SAE twice. The
lock is ``fcntl.flock`` on ``<out>/.dictbench.lock``: the kernel drops it when the
holder exits for any reason, SIGKILL included, so a lock left by a killed run is
taken over without anyone deleting files by hand. The file holds the holder's pid,
host and start time, for the refusal message only.

Where ``fcntl`` does not exist (Windows) the lock is an exclusive-create file whose
holder is considered gone when its pid no longer runs on this host.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from dictbench.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - exercised by monkeypatching in the tests
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".dictbench.lock"


def _holder_info() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _describe(raw: str) -> str:
    try:
        info = json.loads(raw)
        return f"pid {info['pid']} on {info['host']}, since {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``with RunLock(folder):`` holds the folder for this process or raises ``UserError``."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.took_over: str | None = None  # description of a dead holder we replaced

    def _refuse(self, raw: str) -> UserError:
        return UserError(
            f"{self.folder}: another dictbench run is writing to this folder "
            f"({_describe(raw)}); wait for it to finish or choose another --out"
        )

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return self._acquire_exclusive_file()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raw = os.pread(fd, 4096, 0).decode(errors="replace")
                os.close(fd)
                raise self._refuse(raw) from None
            # The previous holder unlinks the file on release; if it did so between our
            # open and our flock we hold a lock on a deleted file. Start over then.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            raw = os.pread(fd, 4096, 0).decode(errors="replace")
            if raw.strip():
                self.took_over = _describe(raw)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_holder_info()).encode(), 0)
            os.fsync(fd)
            self.fd = fd
            return self

    def _acquire_exclusive_file(self) -> RunLock:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raw = self.path.read_text(errors="replace") if self.path.exists() else ""
                try:
                    info = json.loads(raw)
                    stale = info["host"] == socket.gethostname() and not _pid_alive(
                        int(info["pid"])
                    )
                except (ValueError, KeyError, TypeError):
                    stale = False
                if not stale:
                    raise self._refuse(raw) from None
                self.took_over = _describe(raw)
                self.path.unlink(missing_ok=True)
                continue
            os.write(fd, json.dumps(_holder_info()).encode())
            os.fsync(fd)
            self.fd = fd
            return self
        raise self._refuse("")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: no one can be mid-take-over
        finally:
            os.close(self.fd)  # closing drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
