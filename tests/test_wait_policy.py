"""The start-up choice of OpenMP's wait policy (bench/wait_policy.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dictbench import wait_policy


def test_cpu_times_parse_the_first_line_of_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 5 20 700 30 1 2 3 0 0\ncpu0 50 2 10 350 15 0 1 1 0 0\n")
    assert wait_policy.read_cpu_times(str(stat)) == (100 + 5 + 20 + 1 + 2 + 3, 131 + 700 + 30)
    assert wait_policy.read_cpu_times(str(tmp_path / "absent")) is None


def test_busy_cores_is_the_busy_share_of_all_cores():
    samples = iter([(1000, 4000), (1150, 4200)])  # 150 of 200 jiffies busy, on 2 cores
    got = wait_policy.busy_cores(0.0, read=lambda: next(samples), sleep=lambda s: None, n_cpus=2)
    assert got == pytest.approx(2 * 150 / 200)


def test_busy_cores_unknown_without_proc_stat():
    assert wait_policy.busy_cores(0.0, read=lambda: None, sleep=lambda s: None) is None


@pytest.mark.parametrize(
    ("busy", "decision"), [(0.0, "default"), (0.49, "default"), (0.5, "passive"), (1.7, "passive")]
)
def test_a_busy_machine_gets_passive_waits(busy, decision, monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # as in a fresh CLI process
    env: dict[str, str] = {}
    assert wait_policy.choose(env, measure=lambda: busy) == decision
    assert env.get("OMP_WAIT_POLICY") == ("PASSIVE" if decision == "passive" else None)


@pytest.mark.parametrize("key", ["OMP_WAIT_POLICY", "GOMP_SPINCOUNT"])
def test_the_users_own_setting_wins(key, monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    env = {key: "ACTIVE" if key == "OMP_WAIT_POLICY" else "1000"}
    assert wait_policy.choose(env, measure=lambda: 2.0) == "user"
    assert env == {key: "ACTIVE" if key == "OMP_WAIT_POLICY" else "1000"}


@pytest.mark.parametrize(("forced", "decision"), [("default", "default"), ("passive", "passive")])
def test_a_forced_choice_skips_the_measurement(forced, decision, monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)

    def never() -> float:
        raise AssertionError("measured although the choice was forced")

    env = {"DICTBENCH_WAIT_POLICY": forced}
    assert wait_policy.choose(env, measure=never) == decision


def test_once_torch_is_loaded_nothing_is_changed():
    import torch  # noqa: F401 - the point: OpenMP has read its settings

    env: dict[str, str] = {}
    assert wait_policy.choose(env, measure=lambda: 2.0) == "too late"
    assert env == {}


CHILD = """
import json, os, sys
from dictbench import cli
import dictbench.wait_policy as wp
calls = []
real = wp.choose
wp.choose = lambda *a, **k: calls.append(real(*a, **k)) or calls[-1]
for argv in (["list"], ["check", "/nonexistent-run", "--reference", "/nonexistent-ref"]):
    calls.clear()
    code = cli.main(argv)
    print(json.dumps({"argv": argv[0], "calls": calls, "code": code,
                      "torch_before": "torch" in sys.modules,
                      "omp": os.environ.get("OMP_WAIT_POLICY")}))
"""


def test_the_cli_chooses_for_commands_that_need_torch_and_not_for_list():
    env = {"PATH": "/usr/bin:/bin", "DICTBENCH_WAIT_POLICY": "passive"}
    res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env)
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert [(d["argv"], d["calls"]) for d in lines] == [("list", []), ("check", ["passive"])]
    assert lines[0]["omp"] is None and lines[1]["omp"] == "PASSIVE"
    assert lines[1]["code"] == 2  # the missing run folder, after the choice


BUSY_CHILD = """
import os
from dictbench import wait_policy
print(wait_policy.choose(), os.environ.get("OMP_WAIT_POLICY"))
"""


def test_beside_two_busy_processes_the_choice_is_passive():
    """Real /proc/stat: two `yes` processes keep both cores of a 2-core machine busy."""
    if wait_policy.read_cpu_times() is None:
        pytest.skip("no /proc/stat on this platform")
    busy = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(2)]
    try:
        res = subprocess.run(
            [sys.executable, "-c", BUSY_CHILD], capture_output=True, text=True, check=True
        )
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert res.stdout.split() == ["passive", "PASSIVE"]
