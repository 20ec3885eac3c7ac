"""The trainer's step with Adam's fused kernel against torch's default one-tensor loop.

dictbench.train.trainer.make_optimizer asks for the fused kernel (one pass over each tensor
instead of about six). This measures what it buys per method and batch size: the same
SAE, weights and batch, the full trainer step (loss, backward, hooks, Adam), the two
optimisers timed interleaved. At the quickstart's batch of 128 tokens Adam over the
2 x 576 x 4,608 weights is a large part of the step; at 4,096 the matmuls dominate.

    python scripts/perf/adam_kernel.py
    python scripts/perf/adam_kernel.py --methods l1 --batches 128 4096 --rounds 7

Writes adam_kernel.csv to --out.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "benchmarks"))

import perf_common as pc  # noqa: E402
from bench_helpers import train_step  # noqa: E402
from step_precision import build  # noqa: E402

from dictbench.allocator import keep_freed_memory  # noqa: E402
from dictbench.train.trainer import make_optimizer  # noqa: E402


def stepper(method: str, batch: torch.Tensor, fused: bool, d_sae: int):
    sae = build(method, "init", batch.shape[1], d_sae, batch)  # step_precision's SAE
    if fused:
        opt = make_optimizer(sae.parameters(), 0.0, (0.9, 0.999))  # lr 0: same work
        assert opt.defaults.get("fused"), "this torch has no fused Adam for the CPU"
    else:
        opt = torch.optim.Adam(sae.parameters(), lr=0.0)
    return lambda: train_step(sae, opt, batch, 10**6)


def main() -> None:
    p = pc.base_parser(__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["l1", "gated", "topk"])
    p.add_argument("--batches", nargs="+", type=int, default=[128, 4096])
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    pc.setup_threads(args.threads)
    keep_freed_memory()
    load_before = pc.load_average()
    rows = []
    for n in args.batches:
        g = torch.Generator().manual_seed(1)
        batch = torch.randn(n, args.d_in, generator=g) * 0.9 + 0.3
        for method in args.methods:
            print(f"{method}, batch {n}:")
            t = pc.interleaved(
                {
                    "fused": stepper(method, batch, True, args.d_sae),
                    "loop": stepper(method, batch, False, args.d_sae),
                },
                args.rounds,
            )
            rows.append(
                {
                    "method": method,
                    "batch": n,
                    "fused_s": pc.median(t["fused"]),
                    "loop_s": pc.median(t["loop"]),
                    "speedup": pc.paired_ratio(t["loop"], t["fused"]),
                    **pc.machine(),
                }
            )
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    pc.write_csv(df, args.out / "adam_kernel.csv")
    print(df[["method", "batch", "fused_s", "loop_s", "speedup"]].to_string(index=False))
    print(pc.footer(load_before, pc.load_average()))


if __name__ == "__main__":
    main()
