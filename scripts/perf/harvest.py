"""Activation harvest: its throughput against the model alone, and its memory against size.

Two questions, from the design goal "tokens per second within 10% of running the model
up to the hook layer alone; memory flat in the number of tokens harvested":

1. Throughput. ``dictbench.data.cache.run_harvest`` (run to the hook, write the memory-mapped
   entry, mean, checksums, fsync, rename) against ``SubjectModel.run_to`` alone on the
   same windows in the same batches, results discarded. Interleaved, in one process.
2. Memory. One child process per harvest size (so peaks do not mix): after the model is
   loaded and warm, a sampler thread reads /proc/self/status every 20 ms while the
   harvest runs. Anonymous memory (RssAnon: tensors, buffers) is what must stay flat;
   file-backed pages (RssFile: the memory-mapped acts.npy being written) are page cache
   the kernel writes back and may drop, and are reported apart.

    python scripts/perf/harvest.py                 # ~4 min on 2 cores
    python scripts/perf/harvest.py --skip-memory --hooks resid_post.6 --rounds 2
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import perf_common as pc  # noqa: E402

from dictbench.data.cache import PendingHarvest, fingerprint, run_harvest  # noqa: E402
from dictbench.data.corpus import CorpusSpec, keep_positions, make_windows  # noqa: E402

CTX = 128
BATCH_WINDOWS = 16  # run_harvest's default; the model-alone side uses the same batches


def quiet(_msg: str) -> None:
    pass


def pending_for(subject: Any, hook: str, windows: np.ndarray, final: Path) -> PendingHarvest:
    corpus = CorpusSpec(ctx_len=CTX)
    fp, ident = fingerprint(subject.fingerprint(), hook, corpus, "train", len(windows), 0)
    return PendingHarvest(final, fp, ident, windows, "train")


def model_alone(subject: Any, hook: str, windows: np.ndarray) -> None:
    with torch.inference_mode():
        for s in range(0, len(windows), BATCH_WINDOWS):
            ids = torch.from_numpy(windows[s : s + BATCH_WINDOWS].astype(np.int64))
            subject.run_to(hook, ids)


def time_hook(subject: Any, hook: str, windows: np.ndarray, rounds: int) -> dict[str, list[float]]:
    """Harvest into a fresh entry (deleted after each round, untimed) vs the model alone."""
    tmp = Path(tempfile.mkdtemp(prefix="dictbench-perf-harvest-"))
    pending = pending_for(subject, hook, windows, tmp / "entry")
    counter = iter(range(1_000_000))

    def harvest() -> None:
        target = dataclasses.replace(pending, final=tmp / f"r{next(counter)}" / "entry")
        run_harvest(subject, hook, target, batch_windows=BATCH_WINDOWS, log=quiet)

    def cleanup() -> None:
        for d in tmp.glob("r*"):
            shutil.rmtree(d, ignore_errors=True)

    try:
        return pc.interleaved(
            {"harvest": harvest, "model_alone": lambda: model_alone(subject, hook, windows)},
            rounds=rounds,
            warmup=1,
            between=cleanup,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def throughput(args: Any, subject: Any, windows: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    n_positions = windows.size
    for hook in args.hooks:
        print(f"{hook}: {len(windows)} windows of {CTX} ({n_positions} positions)")
        load0 = pc.load_average()
        times = time_hook(subject, hook, windows, args.rounds)
        load1 = pc.load_average()
        ratio = pc.paired_ratio(times["harvest"], times["model_alone"])
        for what, ts in times.items():
            rows.append(
                {
                    "part": "throughput",
                    "hook": hook,
                    "what": what,
                    "positions": n_positions,
                    "tokens_per_s": n_positions / pc.median(ts),
                    "median_s": pc.median(ts),
                    "min_s": min(ts),
                    "harvest_time_over_model_alone": ratio,
                    "rounds": len(ts),
                    "load_1m_before": load0,
                    "load_1m_after": load1,
                    "times_s": ";".join(f"{t:.4f}" for t in ts),
                    **pc.machine(),
                }
            )
    return rows


# --- memory: one child process per size ----------------------------------------------------


def _status() -> dict[str, int]:
    """Resident-memory fields of /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) * 1024
    return out


def child(tokens_file: str, n_windows: int, hook: str, cache_dir: str) -> None:
    """Runs in its own process: load, warm up, then harvest while sampling memory."""
    torch.set_num_threads(int(sys.argv[sys.argv.index("--child-threads") + 1]))
    subject = pc.load_embedded_model()
    windows = np.load(tokens_file)[:n_windows]
    model_alone(subject, hook, windows[:BATCH_WINDOWS])  # warm: allocator, lazy init
    # Choosing the entry (the model fingerprint makes a transient float64 copy of some
    # weights, ~216 MB for SmolLM2) happens before a harvest, in prepare(): not measured.
    pending = pending_for(subject, hook, windows, Path(cache_dir) / "entry")
    base = _status()
    peak = dict(base)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for k, v in _status().items():
                peak[k] = max(peak[k], v)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    store = run_harvest(subject, hook, pending, batch_windows=BATCH_WINDOWS, log=quiet)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    for k, v in _status().items():
        peak[k] = max(peak[k], v)
    print(
        json.dumps(
            {
                "acts_bytes": int(store.acts.nbytes),
                "seconds": seconds,
                **{f"base_{k}": v for k, v in base.items()},
                **{f"peak_{k}": v for k, v in peak.items()},
            }
        )
    )


def memory(args: Any, windows: np.ndarray) -> list[dict[str, Any]]:
    rows = []
    per_window = int(keep_positions(CTX).sum())
    with tempfile.TemporaryDirectory(prefix="dictbench-perf-mem-") as tmp:
        tokens_file = Path(tmp) / "windows.npy"
        np.save(tokens_file, windows)
        for n_tokens in args.memory_tokens:
            n_win = -(-n_tokens // per_window)
            cache = Path(tmp) / f"cache-{n_tokens}"
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(tokens_file),
                str(n_win),
                args.memory_hook,
                str(cache),
                "--child-threads",
                str(torch.get_num_threads()),
            ]
            load0 = pc.load_average()
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                raise SystemExit(f"memory child failed:\n{res.stderr[-3000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            shutil.rmtree(cache, ignore_errors=True)
            mb = 1 << 20
            row = {
                "part": "memory",
                "hook": args.memory_hook,
                "tokens_harvested": n_win * per_window,
                "positions": n_win * CTX,
                "acts_mb": r["acts_bytes"] / mb,
                "seconds": r["seconds"],
                "tokens_per_s": n_win * CTX / r["seconds"],
                "anon_growth_mb": (r["peak_RssAnon"] - r["base_RssAnon"]) / mb,
                "file_backed_growth_mb": (r["peak_RssFile"] - r["base_RssFile"]) / mb,
                "rss_growth_mb": (r["peak_VmRSS"] - r["base_VmRSS"]) / mb,
                "base_anon_mb": r["base_RssAnon"] / mb,
                "load_1m_before": load0,
                "load_1m_after": pc.load_average(),
                **pc.machine(),
            }
            print(
                f"  {row['tokens_harvested']} tokens: anon +{row['anon_growth_mb']:.1f} MB, "
                f"file-backed +{row['file_backed_growth_mb']:.1f} MB, acts {row['acts_mb']:.1f} "
                f"MB, {row['seconds']:.1f} s"
            )
            rows.append(row)
    return rows


def plot(df: pd.DataFrame, path: Path, note: str) -> None:
    thr = df[df.part == "throughput"]
    mem = df[df.part == "memory"]
    fig, axes = pc.new_figure(ncols=2, width=5.2, height=4.2)
    ax = axes[0]
    if len(thr):
        hooks = list(dict.fromkeys(thr.hook))
        x = np.arange(len(hooks))
        for i, (what, colour) in enumerate([("model_alone", "#999999"), ("harvest", "#1f77b4")]):
            vals = [
                float(thr[(thr.hook == h) & (thr.what == what)].tokens_per_s.iloc[0]) for h in hooks
            ]
            ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, color=colour, label=what.replace("_", " "))
        for j, h in enumerate(hooks):
            r = float(thr[thr.hook == h].harvest_time_over_model_alone.iloc[0])
            ax.text(j, 0, f"harvest time\n{r:.3f}x", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, hooks)
        ax.set_ylabel("tokens per second (median)")
        ax.set_title("harvest vs the model up to the hook alone", fontsize=9)
        ax.legend(fontsize=8)
    ax = axes[1]
    if len(mem):
        t = mem.tokens_harvested
        ax.plot(t, mem.anon_growth_mb, "-o", label="anonymous memory growth (peak)")
        ax.plot(t, mem.file_backed_growth_mb, "--s", label="file-backed pages of acts.npy (peak)")
        ax.plot(t, mem.acts_mb, ":", color="black", label="size of acts.npy")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=10)
        ax.set_xticks(list(t), [f"{v // 1000}k" for v in t])
        ax.minorticks_off()
        ax.set_xlabel(f"tokens harvested at {mem.hook.iloc[0]}")
        ax.set_ylabel("MB above the warm model")
        ax.set_title("memory during a harvest", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(note, fontsize=6)
    pc.write_png(fig, path)


def main(argv: list[str] | None = None) -> None:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        tokens_file, n_win, hook, cache_dir = sys.argv[i + 1 : i + 5]
        child(tokens_file, int(n_win), hook, cache_dir)
        return
    p = pc.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--hooks", nargs="+", default=["resid_post.6", "resid_post.15"])
    p.add_argument("--tokens", type=int, default=4096, help="positions per throughput round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after 1 warm-up)")
    p.add_argument("--memory-hook", default="resid_post.2")
    p.add_argument("--memory-tokens", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args(argv)
    pc.setup_threads(args.threads)
    load0 = pc.load_average()
    subject = pc.load_embedded_model()
    per_window = int(keep_positions(CTX).sum())
    need = max([args.tokens // CTX] + [-(-t // per_window) for t in args.memory_tokens])
    windows = make_windows(subject.tokenizer, CorpusSpec(ctx_len=CTX), "train", need, 0)
    rows: list[dict[str, Any]] = []
    if not args.skip_throughput:
        rows += throughput(args, subject, windows[: max(1, args.tokens // CTX)])
    if not args.skip_memory:
        del subject
        rows += memory(args, windows)
    df = pd.DataFrame(rows)
    note = pc.footer(load0, pc.load_average())
    args.out.mkdir(parents=True, exist_ok=True)
    pc.write_csv(df, args.out / "harvest.csv")
    plot(df, args.out / "harvest.png", note)
    show = [
        c
        for c in [
            "part",
            "hook",
            "what",
            "tokens_harvested",
            "tokens_per_s",
            "harvest_time_over_model_alone",
            "anon_growth_mb",
            "file_backed_growth_mb",
            "acts_mb",
        ]
        if c in df
    ]
    print(df[show].to_string(index=False))
    print(note)


if __name__ == "__main__":
    main()
