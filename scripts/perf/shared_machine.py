"""How training steps behave on a shared machine: alone, and beside one busy process.

On 2 cores, torch's OpenMP threads spin while they wait for each other. When another
process holds one core, the thread that shares that core is descheduled for whole time
slices while its partner spins, and small-op steps (the e2e step: many small layers)
slow down far more than a fair share of the cores predicts (2x). This script measures
each candidate policy in both conditions in one go:

    python scripts/perf/shared_machine.py                        # ~6 min on 2 cores
    python scripts/perf/shared_machine.py --workloads e2e sae --rounds 6

Each candidate runs in a process of its own (OpenMP reads its settings once, at start);
inside it, blocks of steps alone and beside `yes > /dev/null` alternate, so both
conditions share the process, its warm-up and the machine's state. Writes
results/perf/shared_machine.csv; the printed table gives medians and the ratios the
policy is judged by (beside / alone, and alone / the default's alone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# name -> environment added to the child's (on top of a clean copy of ours)
CANDIDATES: dict[str, dict[str, str]] = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin-1k": {"GOMP_SPINCOUNT": "1000"},
    "spin-10k": {"GOMP_SPINCOUNT": "10000"},
    "spin-100k": {"GOMP_SPINCOUNT": "100000"},
    "one-thread": {"OMP_NUM_THREADS": "1"},
    "auto": {},  # dictbench's own choice (bench/wait_policy.py), made at process start
}
OMP_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "DICTBENCH_OMP_POLICY")


def _e2e_step() -> object:
    """The e2e step at resid_post.6 on one 128-token window (as scripts/perf/e2e_step.py)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
    import e2e_step
    import perf_common as pc
    from bench_helpers import train_step

    from dictbench.data.corpus import CorpusSpec, make_windows

    subject = pc.load_embedded_model()
    windows = make_windows(subject.tokenizer, CorpusSpec(ctx_len=128), "train", 1, 0)
    ids = torch.from_numpy(windows.astype(np.int64))
    batch, ours, _ = e2e_step.build(subject, "resid_post.6", "e2e", ids)
    opt = e2e_step.make_optimizer(ours.parameters())
    state = {"step": 0}

    def run() -> None:
        train_step(ours, opt, batch, state["step"])
        state["step"] += 1

    return run


def _sae_step() -> object:
    """An L1 SAE step at the quickstart's size (d_sae 4608) on a batch of 4096: large
    matmuls, the other end of the range."""
    import torch

    sys.path.insert(0, str(ROOT / "tests" / "benchmarks"))
    from bench_helpers import train_step

    from dictbench import registry
    from dictbench.train.trainer import make_optimizer

    torch.manual_seed(0)
    x = torch.randn(4096, 576)
    cls = registry.get_baseline("l1")
    sae = cls(cls.config_class(d_in=576, d_sae=4608))
    sae.train()
    sae.on_train_start(1000, x)
    opt = make_optimizer(sae.parameters(), 1e-4, (0.9, 0.999))
    state = {"step": 0}

    def run() -> None:
        train_step(sae, opt, x, state["step"])
        state["step"] += 1

    return run


def child(workload: str, rounds: int, steps: int, conditions: list[str], auto: bool) -> None:
    """Alternate blocks of ``steps`` timed steps in each condition; print JSON. With
    ``auto`` the wait policy is dictbench's start-up choice (made before torch loads)."""
    from dictbench.allocator import keep_freed_memory

    keep_freed_memory()
    policy = None
    if auto:
        from dictbench import wait_policy

        policy = wait_policy.choose()
    import torch

    run = _e2e_step() if workload == "e2e" else _sae_step()
    run()  # warm-up
    times: dict[str, list[float]] = {c: [] for c in conditions}
    for _ in range(rounds):
        for condition in conditions:
            busy = None
            if condition == "beside_yes" and not auto:  # auto's parent started it
                busy = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)
                time.sleep(0.5)
            try:
                run()  # one untimed step after each switch
                for _ in range(steps):
                    t0 = time.perf_counter()
                    run()
                    times[condition].append(time.perf_counter() - t0)
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
            time.sleep(0.5)
    out = {"threads": torch.get_num_threads(), "times": times, "policy": policy}
    print(json.dumps(out))


def _run_child(candidate: str, workload: str, args: argparse.Namespace, conditions: list[str]):
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS}
    env.update(CANDIDATES[candidate])
    cmd = [sys.executable, __file__, "--child", workload, "--rounds", str(args.rounds)]
    cmd += ["--steps", str(args.steps), "--conditions", *conditions]
    if candidate == "auto":
        cmd.append("--auto")
    busy = None
    if candidate == "auto" and conditions == ["beside_yes"]:
        busy = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL)  # there before we start
        time.sleep(0.5)
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(candidate: str, workload: str, args: argparse.Namespace) -> dict:
    """Both conditions for one candidate: in one process, or (``auto``, whose choice is
    made at start) in one process per condition."""
    load0 = os.getloadavg()[0]
    both = ["alone", "beside_yes"]
    if candidate != "auto":
        got = _run_child(candidate, workload, args, both)
    else:
        parts = [_run_child(candidate, workload, args, [c]) for c in both]
        got = {"threads": parts[0]["threads"], "times": {}}
        got["policy"] = "/".join(str(p["policy"]) for p in parts)
        for p in parts:
            got["times"].update(p["times"])
    alone = statistics.median(got["times"]["alone"])
    beside = statistics.median(got["times"]["beside_yes"])
    return {
        "workload": workload,
        "candidate": candidate,
        "env": " ".join(f"{k}={v}" for k, v in CANDIDATES[candidate].items()) or "(none)",
        "threads": got["threads"],
        "policy_chosen": got.get("policy"),
        "alone_s": round(alone, 4),
        "beside_yes_s": round(beside, 4),
        "beside_over_alone": round(beside / alone, 3),
        "n_steps": len(got["times"]["alone"]),
        "load_1m_before": load0,
        "times_alone": ";".join(f"{t:.4f}" for t in got["times"]["alone"]),
        "times_beside": ";".join(f"{t:.4f}" for t in got["times"]["beside_yes"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=("e2e", "sae"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--conditions", nargs="+", default=["alone", "beside_yes"], help=argparse.SUPPRESS
    )
    ap.add_argument("--auto", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workloads", nargs="+", default=["e2e"], choices=("e2e", "sae"))
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    ap.add_argument("--rounds", type=int, default=2, help="alone/beside blocks per candidate")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per block")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "perf")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.rounds, args.steps, args.conditions, args.auto)
        return
    import pandas as pd

    rows = []
    for workload in args.workloads:
        for candidate in args.candidates:
            rows.append(measure(candidate, workload, args))
            print(json.dumps({k: rows[-1][k] for k in list(rows[-1])[:8]}), flush=True)
    df = pd.DataFrame(rows)
    base = df[df.candidate == "default"].set_index("workload").alone_s
    df["alone_over_default_alone"] = [
        round(r.alone_s / base[r.workload], 3) if r.workload in base else float("nan")
        for r in df.itertuples()
    ]
    df["beside_over_default_alone"] = [
        round(r.beside_yes_s / base[r.workload], 3) if r.workload in base else float("nan")
        for r in df.itertuples()
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "shared_machine.csv", index=False)
    cols = ["workload", "candidate", "alone_s", "beside_yes_s", "beside_over_default_alone"]
    cols += ["alone_over_default_alone"]
    print(df[cols].to_string(index=False))
    print(f"load average after: {os.getloadavg()[0]:.2f}; wrote {args.out / 'shared_machine.csv'}")


if __name__ == "__main__":
    main()
