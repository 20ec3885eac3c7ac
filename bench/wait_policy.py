"""How torch's OpenMP threads wait for each other, chosen from the machine's load at start.

By default libgomp's idle threads spin for a while before they sleep. On a quiet machine
that is the fastest choice. When another process holds a core, a spinning thread burns
the time slices its partner needs: on a 2-core machine beside one ``yes > /dev/null``,
the e2e training step (many small layers) ran 2.9x slower than alone, where a fair share
of the cores predicts 2x. ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once) brought it to
2.1x, but costs about 20% on a quiet machine (``scripts/perf/shared_machine.py`` measures
both conditions for each candidate; docs/performance.md has the table).

So the CLI samples the machine for a moment before torch is imported: when other work
already keeps at least half a core busy, it sets ``OMP_WAIT_POLICY=PASSIVE`` for this
process and its children; otherwise it leaves libgomp's default. The wait policy changes
only how threads wait, never what they compute, so results are identical either way.
OpenMP reads the setting once, when torch loads, so a load that starts later is not
reacted to. A user's own ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` always wins, and
``DICTBENCH_WAIT_POLICY=default|passive`` forces a choice (``auto`` is the default).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

BUSY_CORES_FOR_PASSIVE = 0.5
SAMPLE_SECONDS = 0.15
_USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def read_cpu_times(path: str = "/proc/stat") -> tuple[int, int] | None:
    """(busy, total) jiffies summed over all CPUs, or None where /proc/stat is absent."""
    try:
        with open(path) as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def busy_cores(
    sample_s: float = SAMPLE_SECONDS,
    read: Callable[[], tuple[int, int] | None] = read_cpu_times,
    sleep: Callable[[float], None] = time.sleep,
    n_cpus: int | None = None,
) -> float | None:
    """How many of the machine's cores other work kept busy over ``sample_s`` seconds
    (this process sleeps meanwhile, so what is counted is the others'), or None."""
    before = read()
    sleep(sample_s)
    after = read()
    if before is None or after is None or after[1] <= before[1]:
        return None
    cpus = n_cpus if n_cpus is not None else (os.cpu_count() or 1)
    return cpus * (after[0] - before[0]) / (after[1] - before[1])


def choose(
    env: dict[str, str] | None = None, measure: Callable[[], float | None] = busy_cores
) -> str:
    """Set ``OMP_WAIT_POLICY`` in ``env`` (default ``os.environ``) where the load calls for
    it; return what was decided, for the log: "user", "too late", "default" or "passive"."""
    env = os.environ if env is None else env
    if any(k in env for k in _USER_KEYS):
        return "user"
    if "torch" in sys.modules:
        return "too late"  # OpenMP has read its settings already
    wanted = env.get("DICTBENCH_WAIT_POLICY", "auto").strip().lower()
    if wanted not in ("auto", "default", "passive"):
        wanted = "auto"
    if wanted == "auto":
        busy = measure()
        wanted = "passive" if busy is not None and busy >= BUSY_CORES_FOR_PASSIVE else "default"
    if wanted == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return wanted
