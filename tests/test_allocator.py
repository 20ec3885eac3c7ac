"""keep_freed_memory: a freed large tensor stays in the process (no munmap), unless the
user opts out. Checked through the resident anonymous memory of a child process, so
the result does not depend on what this test process has allocated before."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the setting is glibc's; other C libraries are left alone",
)

CHILD = """
import sys, torch
from dictbench.allocator import keep_freed_memory

def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

applied = keep_freed_memory()
assert keep_freed_memory() == applied  # idempotent
t = torch.ones(16 << 20)  # 64 MiB, every page touched
held = rss_anon()
del t
print(int(applied), held - rss_anon())
"""


def run_child(env_extra: dict[str, str]) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "DICTBENCH_SYSTEM_MALLOC"}
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
    )
    applied, released = out.stdout.split()
    return bool(int(applied)), int(released)


def test_freed_tensor_memory_stays_in_the_process():
    applied, released = run_child({})
    assert applied
    assert released < 8 << 20  # nothing like the 64 MiB went back to the system


def test_opting_out_keeps_glibc_returning_large_blocks():
    applied, released = run_child({"DICTBENCH_SYSTEM_MALLOC": "1"})
    assert not applied
    assert released > 56 << 20  # the block was unmapped on free


def test_every_cli_command_starts_with_the_setting(monkeypatch, capsys):
    from dictbench import cli

    calls: list[int] = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["list"]) == 0
    assert calls == [1]
