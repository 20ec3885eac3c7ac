"""Measure how long `dictbench --help`, each subcommand's `--help` and `dictbench list` take.

Each command is run as a fresh process (what a user types), several times; the median and
the spread are printed with the machine's load average, since start-up time on a busy
machine says more about the machine than about dictbench. Run on a quiet machine:

    python scripts/perf/cli_startup.py --repeat 10
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = [
    ["--help"],
    ["list"],
    ["run", "--help"],
    ["check", "--help"],
    ["eval", "--help"],
    ["export", "--help"],
    ["leaderboard", "--help"],
]


def _entry() -> list[str]:
    exe = shutil.which("dictbench")
    return [exe] if exe else [sys.executable, "-m", "dictbench.cli"]


def time_once(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child): on a loaded machine the wall time is
    mostly the wait for a core, while the CPU time is what dictbench itself spends."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="runs per command (default 10)")
    args = parser.parse_args()
    entry = _entry()
    load = os.getloadavg()
    print(f"entry: {' '.join(entry)}; cpus: {os.cpu_count()}; load: {load[0]:.2f} {load[1]:.2f}")
    print(f"{'command':<24} {'median s':>9} {'min s':>7} {'max s':>7} {'cpu s':>7}")
    worst = 0.0
    for cmd in COMMANDS:
        time_once(entry + cmd)  # warm the file cache once
        pairs = [time_once(entry + cmd) for _ in range(args.repeat)]
        runs = [w for w, _ in pairs]
        cpu = statistics.median(c for _, c in pairs)
        med = statistics.median(runs)
        worst = max(worst, med)
        print(f"{' '.join(cmd):<24} {med:>9.3f} {min(runs):>7.3f} {max(runs):>7.3f} {cpu:>7.3f}")
    load = os.getloadavg()
    print(f"slowest median: {worst:.3f} s; load after: {load[0]:.2f} {load[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
