"""The token tasks' per-batch cost: each accumulator's ``update`` on one evaluation batch.

Every SAE scored pays these once per batch of evaluation tokens, on top of its own
encode and decode, so they are part of the per-SAE cost that ``dictbench eval`` of many
SAEs cannot share. Also timed, interleaved in the same process: torch's own integer
counts (``count_nonzero``, boolean sums), which the blocked float32 counts of
``dictbench.score.indicators`` replace, on the same code. The code is a ReLU of
Gaussian pre-activations (about 46% nonzero, like the random SAEs the eval benchmarks
use); the allocator settings are the CLI's (perf_common).

    python scripts/perf/token_accumulators.py                 # 8,192 x 4,608, 20 rounds
    python scripts/perf/token_accumulators.py --tokens 8192 --d-sae 16384
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import perf_common as pc  # noqa: E402

from dictbench.score.indicators import nonzero_per_row, positive_per_column  # noqa: E402
from dictbench.tasks.dead_latents import DeadLatentsAccumulator  # noqa: E402
from dictbench.tasks.reconstruction import ReconstructionAccumulator  # noqa: E402
from dictbench.tasks.shrinkage import ShrinkageAccumulator  # noqa: E402
from dictbench.tasks.sparsity import SparsityAccumulator  # noqa: E402


def batch(tokens: int, d_in: int, d_sae: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d_in, generator=g)
    f = torch.relu(torch.randn(tokens, d_sae, generator=g) - 0.1)
    x_hat = x + 0.1 * torch.randn(tokens, d_in, generator=g)
    return x, f, x_hat


def main() -> None:
    p = pc.base_parser(__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    pc.setup_threads(args.threads)
    x, f, x_hat = batch(args.tokens, args.d_in, args.d_sae)
    accs = {
        "sparsity": SparsityAccumulator(),
        "dead_latents": DeadLatentsAccumulator(),
        "reconstruction": ReconstructionAccumulator(),
        "shrinkage": ShrinkageAccumulator(),
    }
    fns = {name: (lambda a=a: a.update(x, f, x_hat)) for name, a in accs.items()}
    fns["L0 + firing counts, torch integer counts"] = lambda: (
        torch.count_nonzero(f),
        (f > 0).sum(0, dtype=torch.int32),
    )
    fns["L0 + firing counts, indicators"] = lambda: (
        nonzero_per_row(f).sum(),
        positive_per_column(f),
    )
    load0 = pc.load_average()
    times = pc.interleaved(fns, args.rounds)
    load1 = pc.load_average()
    rows = [{"side": k, "median_ms": 1000 * pc.median(v)} for k, v in times.items()]
    total = sum(r["median_ms"] for r in rows[: len(accs)])
    rows.append({"side": "four token tasks together", "median_ms": total})
    for r in rows:
        print(f"{r['side']:>42}: {r['median_ms']:8.1f} ms")
    print(f"batch {args.tokens} x {args.d_sae}   ({pc.footer(load0, load1)})")
    df = pd.DataFrame(rows).assign(tokens=args.tokens, d_sae=args.d_sae, **pc.machine())
    args.out.mkdir(parents=True, exist_ok=True)
    df = df.assign(load_before=load0, load_after=load1)
    pc.write_csv(df, args.out / "token_accumulators.csv")


if __name__ == "__main__":
    main()
