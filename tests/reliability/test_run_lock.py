"""One writer per run folder (bench/io/lock.py), with holders that are real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dictbench.errors import UserError
from dictbench.io import lock as lockmod
from dictbench.io.lock import LOCK_NAME, RunLock

HOLD = """
import sys, time
from pathlib import Path
from dictbench.io.lock import RunLock
lock = RunLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(120)
"""


def hold_in_subprocess(folder: Path) -> subprocess.Popen:
    """Another process that takes the lock and keeps it until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(UserError) as err:
            RunLock(tmp_path).acquire()
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{tmp_path}: another dictbench run is writing to this folder (pid ")
    assert f"pid {os.getpid()} on " in msg and "choose another --out" in msg


def test_release_removes_the_file_and_frees_the_folder(tmp_path):
    first = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()
    with RunLock(tmp_path) as again:
        assert again.took_over is None


def test_a_live_holder_in_another_process_blocks(tmp_path):
    proc = hold_in_subprocess(tmp_path)
    try:
        with pytest.raises(UserError, match=f"pid {proc.pid} on "):
            RunLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_a_sigkilled_holder_leaves_a_stale_lock_that_is_taken_over(tmp_path):
    proc = hold_in_subprocess(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / LOCK_NAME).exists()  # nothing cleaned up after SIGKILL
    with RunLock(tmp_path) as lock:
        assert lock.took_over is not None and f"pid {proc.pid} " in lock.took_over
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_without_fcntl_a_dead_pid_is_stale_and_a_live_one_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(lockmod, "fcntl", None)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a pid that no longer runs
    info = {"pid": proc.pid, "host": lockmod.socket.gethostname(), "started": "then"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(info))
    with RunLock(tmp_path) as lock:
        assert lock.took_over == f"pid {proc.pid} on {info['host']}, since then"
        with pytest.raises(UserError, match=f"pid {os.getpid()} on "):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()


def test_dictbench_run_refuses_a_folder_another_run_holds(tmp_path, tiny_spec_file, cli):
    out = tmp_path / "out"
    proc = hold_in_subprocess(out)
    try:
        res = cli.run(
            ["run", str(tiny_spec_file), "--out", str(out)], tmp_path / "logs", tmp_path / "e"
        )
    finally:
        proc.kill()
        proc.wait()
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == [
        f"dictbench: error: {out}: another dictbench run is writing to this folder "
        f"(pid {proc.pid} on {lockmod.socket.gethostname()}, since "
        + lines[0].split(", since ", 1)[1]
    ]
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # no run.json, no results


def test_a_run_started_while_the_lock_was_held_succeeds_once_the_holder_died(
    tmp_path, tiny_spec_file, cli
):
    out = tmp_path / "out"
    proc = hold_in_subprocess(out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    res = cli.run(
        ["run", str(tiny_spec_file), "--out", str(out)], tmp_path / "logs", tmp_path / "e"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"note: an earlier run in {out} (pid {proc.pid} on " in res.stdout
    assert not (out / LOCK_NAME).exists()
