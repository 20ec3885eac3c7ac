"""`dictbench eval` of N SAEs: one call for all of them against N separate calls.

Both sides run the real CLI in a fresh process, as a user does, on N SAELens-layout
SAEs (random standard SAEs of width --d-sae) at one hook of the embedded model, and
both find the activation cache warm (an untimed warm-up call fills it; later calls
also find the SAE-independent downstream results stored beside it). So the difference
is what one call shares between its SAEs: start-up, the model load, opening the
caches, and the task environment; per SAE each side still runs its own encode/decode
and spliced downstream pass. Reported: seconds per SAE on each side and their ratio
(the issue's goal: at least 3x), interleaved by rounds (perf_common), with the load.

    python scripts/perf/eval_many.py                        # 8 SAEs, quickstart eval size
    python scripts/perf/eval_many.py --saes 8 --set eval.tokens=8192 --rounds 2

Take figures on a quiet machine; the CSV goes to --out (results/perf/eval_many.csv).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

import perf_common as pc  # noqa: E402


def make_saes(folder: Path, n: int, d_in: int, d_sae: int, hook_name: str) -> list[Path]:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        sae = folder / f"sae{i}"
        sae.mkdir(parents=True)
        tensors = {
            "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
            "b_enc": -0.5 * torch.ones(d_sae),
            "W_dec": torch.randn(d_sae, d_in, generator=g) / d_sae**0.5,
            "b_dec": torch.zeros(d_in),
        }
        save_file(tensors, str(sae / "sae_weights.safetensors"))
        cfg = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae}
        cfg["metadata"] = {"hook_name": hook_name}
        (sae / "cfg.json").write_text(json.dumps(cfg))
        out.append(sae)
    return out


def eval_cmd(saes: list[Path], out: Path, args) -> list[str]:
    cmd = [sys.executable, "-m", "dictbench.cli", "eval", *map(str, saes), "--out", str(out)]
    cmd += ["--preset", args.preset]
    for s in args.set or []:
        cmd += ["--set", s]
    return cmd


def run(cmd: list[str], env: dict[str, str]) -> None:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{res.stderr[-2000:]}")


def main() -> None:
    p = pc.base_parser(__doc__.splitlines()[0])
    p.add_argument("--saes", type=int, default=8)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--d-in", type=int, default=576, help="the embedded model's width")
    p.add_argument("--hook", default="blocks.6.hook_resid_post")
    p.add_argument("--preset", default="quickstart")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--cache", type=Path, default=None, help="activation cache (default: temp)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="eval_many-"))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    env["DICTBENCH_CACHE"] = str(args.cache or work / "cache")
    try:
        saes = make_saes(work / "saes", args.saes, args.d_in, args.d_sae, args.hook)
        print(f"warm-up: filling the activation cache in {env['DICTBENCH_CACHE']} ...")
        run(eval_cmd(saes[:1], work / "warmup", args), env)
        counter = iter(range(10**6))

        def together() -> None:
            run(eval_cmd(saes, work / f"one-{next(counter)}", args), env)

        def separately() -> None:
            k = next(counter)
            for i, sae in enumerate(saes):
                run(eval_cmd([sae], work / f"sep-{k}-{i}", args), env)

        load0 = pc.load_average()
        times = pc.interleaved(
            {"one call": together, "separate calls": separately}, args.rounds, warmup=0
        )
        load1 = pc.load_average()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = args.saes
    per = {k: [t / n for t in v] for k, v in times.items()}
    ratio = pc.paired_ratio(per["separate calls"], per["one call"])
    rows = [
        {"side": k, "saes": n, "d_sae": args.d_sae, "median_s_per_sae": pc.median(v)}
        for k, v in per.items()
    ]
    for r in rows:
        print(f"{r['side']:>15}: {r['median_s_per_sae']:.2f} s per SAE")
    print(f"separate / one call: {ratio:.2f}x   ({pc.footer(load0, load1)})")
    args.out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows).assign(ratio=ratio, load_before=load0, load_after=load1)
    pc.write_csv(df, args.out / "eval_many.csv")


if __name__ == "__main__":
    main()
