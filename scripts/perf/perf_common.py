"""What every performance script here shares: interleaved timing, the load note, outputs.

Why interleaved: this kind of machine is shared and its speed drifts by 1.5x from one
second to the next (other jobs, frequency scaling). Timing all rounds of A and then
all rounds of B lets that drift land on one side only. Alternating A and B within
each round (and reversing the order every other round) exposes both to the same
conditions, so the ratio of their medians holds even when the absolute numbers do not.
Every script therefore reports ratios, plus the absolute medians with the load average
seen while they ran.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from dictbench.allocator import keep_freed_memory
from dictbench.io import atomic

DEFAULT_OUT = Path("results/perf")

# As the CLI does, for both sides of every comparison (DICTBENCH_SYSTEM_MALLOC=1: off).
FREED_MEMORY_KEPT = keep_freed_memory()


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the CSV and PNG")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    return p


def setup_threads(n: int | None) -> None:
    if n is not None:
        torch.set_num_threads(n)


def load_average() -> float:
    """1-minute load average (what ``uptime`` prints first)."""
    return float(os.getloadavg()[0])


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        # How idle OpenMP threads wait (GOMP spins by default). On a shared machine this
        # changes sort-heavy steps several-fold, so every result records it.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "platform": platform.platform(terse=True),
        "date": datetime.date.today().isoformat(),
    }


def interleaved(
    fns: dict[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 1,
    between: Callable[[], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, list[float]]:
    """Seconds per call of each function, timed in alternation.

    Round r runs every function once, in the given order on even rounds and reversed on
    odd ones (A B, B A, A B, ...), so neither side always runs first after a pause.
    ``warmup`` untimed rounds come first (allocator, caches, lazy init). ``between``
    runs after each call, outside the timing (e.g. deleting a harvested entry).
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            dt = time.perf_counter() - t0
            if between is not None:
                between()
            if r >= warmup:
                times[name].append(dt)
        if r >= warmup:
            done = ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names)
            log(f"  round {r - warmup + 1}/{rounds}: {done} (load {load_average():.2f})")
    return times


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median of the per-round ratios: each round's pair ran under the same conditions."""
    return float(statistics.median(a / b for a, b in zip(num, den, strict=True)))


def write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic.write_bytes(path, df.to_csv(index=False).encode())


def write_png(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic.write_bytes(path, buf.getvalue())


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.2) -> Any:
    """A Figure without pyplot's global state (no display needed: the Agg canvas)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def load_embedded_model() -> Any:
    from dictbench.data.subject import EMBEDDED_MODEL, ModelSpec, SubjectModel

    return SubjectModel.load(ModelSpec(name=EMBEDDED_MODEL, device="cpu"))


def footer(load_before: float, load_after: float) -> str:
    m = machine()
    return (
        f"{m['cpu_count']}-core CPU, {m['torch_threads']} torch threads, float32, torch "
        f"{m['torch']}, OMP_WAIT_POLICY {m['omp_wait_policy']}, {m['date']}, "
        f"load average {load_before:.2f} before / {load_after:.2f} after"
    )
