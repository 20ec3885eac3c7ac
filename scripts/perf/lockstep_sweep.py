"""Lockstep training against the first version's sequential path, on the embedded model.

Modes (each measured in a process of its own, so peak RSS is its own):
  stream      lockstep, activations streamed from the model: no training cache on disk
  cache       lockstep over a harvested cache entry
  sequential  harvest a cache, then train each SAE alone (the first version's path)

    python scripts/perf/lockstep_sweep.py --compare --tokens 500000 --saes 5 --rounds 2
    python scripts/perf/lockstep_sweep.py --rss-curve --tokens 250000 1000000 4000000 \
        --saes 1 --d-sae 1152 --hook resid_post.0 --buffer-tokens 131072 --corpus-repeat 3
    python scripts/perf/lockstep_sweep.py --compare --sweep e2e --saes 3 --tokens 8192 --batch 128
    python scripts/perf/lockstep_sweep.py --mode stream --device cuda --saes 4 --tokens 2000000

--compare runs the modes interleaved round by round and writes results/perf/lockstep_<sweep>.csv;
--rss-curve runs stream mode at each token count (peak RSS should stay flat once the
budget exceeds the buffer, so pass a --buffer-tokens below the smallest count). The
corpus must hold the tokens asked for: the embedded one has about 2.2M training tokens,
and --corpus-repeat N writes a local jsonl corpus holding each address N times (each copy
a document of its own) for larger budgets. An early hook (resid_post.0) makes the model's
forward cheap without changing what is buffered (d_model floats per token).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("l1", "topk", "batchtopk", "gated", "jumprelu", "l1_april")


E2E_SPARSITY = (3.0, 10.0, 30.0)  # the README reproduction's three e2e settings


def _plans(n: int, sweep: str) -> list:
    """``n`` local SAEs of different methods, or (``sweep`` "e2e") ``n`` e2e settings."""
    from dictbench.registry import get_baseline
    from dictbench.runner import PlannedSAE

    out = []
    for i in range(n):
        if sweep == "e2e":
            params = {"sparsity_coefficient": E2E_SPARSITY[i % 3], "lr": 1e-3}
            out.append(PlannedSAE(f"e2e-{i}", "e2e", get_baseline("e2e"), params))
            continue
        method = METHODS[i % len(METHODS)]
        out.append(PlannedSAE(f"{method}-{i}", method, get_baseline(method), {}))
    return out


def _repeated_corpus(folder: Path, copies: int) -> list[str]:
    """A jsonl corpus holding every embedded address ``copies`` times; spec overrides."""
    from dictbench.data.corpus import CorpusSpec, load_documents

    docs = load_documents(CorpusSpec(eval_fraction=0.0))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.jsonl"
    with open(path, "w") as fh:
        for copy in range(copies):
            for row in docs:
                fh.write(json.dumps({"text": f"Copy {copy}.\n{row['text']}"}) + "\n")
    return ["corpus.name=repeated-sotu", f"corpus.data_files=[{path}]", "corpus.format=json"]


def _vm_hwm_mb() -> float | None:
    """Peak resident memory since the last reset (Linux VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _reset_vm_hwm() -> None:
    """Reset VmHWM (Linux: writing 5 to clear_refs), so it measures what follows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def measure(mode: str, tokens: int, args: argparse.Namespace) -> dict:
    """Train ``args.saes`` SAEs on ``tokens`` tokens in one mode; wall, RSS, disk, tokens/s."""
    import torch

    from dictbench.data.cache import EntryRequest, prepare, run_harvest
    from dictbench.data.subject import SubjectModel
    from dictbench.spec import resolve
    from dictbench.train.run_training import RunFolder, TrainingData, train_planned

    n_saes, device, sweep = args.saes, args.device, args.sweep
    tmp = Path(tempfile.mkdtemp(prefix="lockstep-"))
    overrides = [
        f"budget.train_tokens={tokens}",
        f"budget.d_sae={args.d_sae}",
        f"budget.batch_size={args.batch}",
        f"model.device={device}",
        f"hook={args.hook}",
        "checkpoint_every_steps=0",
    ]
    if args.buffer_tokens:
        overrides.append(f"budget.buffer_tokens={args.buffer_tokens}")
    if args.corpus_repeat > 1:
        overrides += _repeated_corpus(tmp / "corpus", args.corpus_repeat)
    spec = resolve(preset="quickstart", overrides=overrides)
    try:
        t0 = time.perf_counter()
        subject = SubjectModel.load(spec.model)
        load_s = time.perf_counter() - t0
        _reset_vm_hwm()  # the model load's transient peak is the same at every budget
        t0 = time.perf_counter()
        request = EntryRequest(spec.corpus, "train", tokens, 0)
        pending = prepare(subject, spec.hook, request, tmp / "cache")
        if mode == "stream":
            data = TrainingData(None, subject, spec.hook, pending.tokens, pending.fingerprint)
            data.ctx_len = int(pending.tokens.shape[1])
        else:
            store = run_harvest(subject, spec.hook, pending, log=lambda m: None)
            data = TrainingData(store, subject, spec.hook, None, "", int(store.acts.shape[1]))
        disk = sum(p.stat().st_size for p in (tmp / "cache").rglob("*") if p.is_file())
        buffer_tokens = spec.budget.buffer_tokens
        run = RunFolder(tmp / "out", lambda m: None, False)
        plans = _plans(n_saes, sweep)
        groups = [plans] if mode != "sequential" else [[p] for p in plans]
        for g in groups:
            train_planned(g, spec, data, [device], run)
        wall = time.perf_counter() - t0
        train_peak = _vm_hwm_mb()
        gpu = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "mode": mode,
        "sweep": sweep,
        "tokens": tokens,
        "saes": n_saes,
        "hook": args.hook,
        "buffer_tokens": buffer_tokens,
        "device": device,
        "load_s": round(load_s, 2),
        "wall_s": round(wall, 2),
        "sae_tokens_per_s": round(tokens * n_saes / wall, 1),
        "peak_rss_mb": round(rss / 2**20, 1),
        "peak_rss_after_load_mb": train_peak,
        "peak_gpu_mb": None if gpu is None else round(gpu / 2**20, 1),
        "disk_mb": round(disk / 2**20, 1),
    }


def _child(mode: str, tokens: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--mode", mode, "--tokens", str(tokens)]
    cmd += ["--saes", str(args.saes), "--device", args.device]
    cmd += ["--d-sae", str(args.d_sae), "--batch", str(args.batch), "--sweep", args.sweep]
    cmd += ["--hook", args.hook, "--buffer-tokens", str(args.buffer_tokens)]
    cmd += ["--corpus-repeat", str(args.corpus_repeat)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("stream", "cache", "sequential"))
    ap.add_argument("--compare", action="store_true")
    ap.add_argument(
        "--modes",
        nargs="+",
        choices=("sequential", "stream", "cache"),
        default=["sequential", "stream", "cache"],
        help="the modes --compare runs, in this order each round",
    )
    ap.add_argument("--rss-curve", action="store_true")
    ap.add_argument("--tokens", type=int, nargs="+", default=[500_000])
    ap.add_argument("--saes", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument(
        "--sweep",
        choices=("local", "e2e"),
        default="local",
        help="local: one SAE per local method; e2e: e2e SAEs at sparsity 3, 10, 30 "
        "(they share the clean pass of the later layers in lockstep)",
    )
    ap.add_argument("--hook", default="resid_post.6")
    ap.add_argument(
        "--buffer-tokens", type=int, default=0, help="budget.buffer_tokens (0: the default)"
    )
    ap.add_argument(
        "--corpus-repeat",
        type=int,
        default=1,
        help="N > 1: train on a local corpus holding each embedded address N times",
    )
    ap.add_argument("--out", default=str(ROOT / "results" / "perf"))
    args = ap.parse_args()
    if args.mode:
        from dictbench import wait_policy

        policy = wait_policy.choose()  # what `dictbench run` would choose, before torch loads
        res = measure(args.mode, args.tokens[0], args)
        res["wait_policy"] = policy
        print(json.dumps(res))
        return
    rows = []
    if args.compare:
        for _ in range(args.rounds):
            for mode in args.modes:
                rows.append(_child(mode, args.tokens[0], args))
                print(json.dumps(rows[-1]), flush=True)
    if args.rss_curve:
        for n in args.tokens:
            rows.append(_child("stream", n, args))
            print(json.dumps(rows[-1]), flush=True)
    if rows:
        name = "lockstep_rss.csv" if not args.compare else f"lockstep_{args.sweep}.csv"
        out = Path(args.out) / name
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
