"""SAE training step throughput per method on one device, float32 against bf16 autocast.

For GPU sessions: one command records what `budget.autocast: bfloat16` buys on the
device at hand (and what the fused float32 kernels do there), next to the device's
own matmul rate in both dtypes. Each method's step is the trainer's (loss under the
run's autocast context, backward, hooks, Adam), on the same weights and batch for
both precisions, timed interleaved (fp32, bf16, fp32, ...) with the device
synchronised around every call. ``trained`` sets the encoder biases so ~1.4% of
latents fire (L0 ~ 64 at d_sae 4,608), the regime most training steps are in.

    python scripts/perf/step_precision.py                         # cuda if present
    python scripts/perf/step_precision.py --device cpu --d-sae 1152 --batch 512 --rounds 2

Writes step_precision_<device>.csv to --out. On a CPU without bf16 units the bf16
column is far slower (a bf16 matmul ran ~60x slower than float32 on this project's
AVX2 machine); the script is for GPUs and for checking that every path runs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "benchmarks"))

import perf_common as pc  # noqa: E402
from bench_helpers import set_trained_sparsity, train_step  # noqa: E402

from dictbench import registry  # noqa: E402
from dictbench.train.trainer import make_optimizer  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(device: str, dtype: torch.dtype, n: int = 4096) -> float:
    """FLOP/s of an n^3 matmul (median of 5 after a warm-up)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(6):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / pc.median(times)


def build(method: str, regime: str, d_in: int, d_sae: int, batch: torch.Tensor) -> Any:
    torch.manual_seed(0)
    cls = registry.get_baseline(method)
    fields = cls.config_class.__dataclass_fields__
    cfg = cls.config_class(d_in=d_in, d_sae=d_sae, **({"k": 32} if "k" in fields else {}))
    sae = cls(cfg).to(batch.device)
    sae.train()
    sae.on_train_start(1000, batch)
    if regime == "trained":
        set_trained_sparsity(sae, batch)
    return sae


def stepper(sae: Any, device: str, dtype: str | None, batch: torch.Tensor) -> Any:
    opt = make_optimizer(sae.parameters(), 0.0, (0.9, 0.999))  # lr 0: same work each round

    def step() -> None:
        train_step(sae, opt, batch, 10**6, dtype)
        sync(device)

    return step


def main() -> None:
    p = pc.base_parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", default=["l1", "gated", "topk", "batchtopk", "jumprelu"])
    p.add_argument("--regimes", nargs="+", default=["init", "trained"])
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--matmul-n",
        type=int,
        default=None,
        help="size of the n^3 matmul that measures the device's rate "
        "(default 4096 on CUDA, 1024 on CPU, where a bf16 4096^3 takes minutes)",
    )
    args = p.parse_args()
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))  # the GPU synchronize() waits for
    pc.setup_threads(args.threads)
    device = args.device
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(args.batch, args.d_in, generator=g) * 0.9 + 0.3).to(device)
    load_before = pc.load_average()
    n = args.matmul_n or (4096 if device.startswith("cuda") else 1024)
    print(f"{device}: measuring the matmul rate ({n}^3, float32 and bf16) ...", flush=True)
    rate32 = matmul_rate(device, torch.float32, n)
    rate16 = matmul_rate(device, torch.bfloat16, n)
    print(f"{device}: matmul {rate32 / 1e9:.0f} GFLOP/s float32, {rate16 / 1e9:.0f} bf16")
    rows = []
    for method in args.methods:
        for regime in args.regimes:
            if (
                regime == "trained"
                and "k" in registry.get_baseline(method).config_class.__dataclass_fields__
            ):
                continue  # TopK fires exactly k in either regime
            fns = {
                prec: stepper(
                    build(method, regime, args.d_in, args.d_sae, batch), device, dt, batch
                )
                for prec, dt in (("float32", None), ("bf16_autocast", "bfloat16"))
            }
            print(f"{method} {regime}:", flush=True)
            times = pc.interleaved(fns, args.rounds)
            t32, t16 = pc.median(times["float32"]), pc.median(times["bf16_autocast"])
            rows.append(
                {
                    "device": device,
                    "device_name": torch.cuda.get_device_name()
                    if device.startswith("cuda")
                    else "cpu",
                    "method": method,
                    "regime": regime,
                    "d_in": args.d_in,
                    "d_sae": args.d_sae,
                    "batch": args.batch,
                    "float32_s": t32,
                    "bf16_autocast_s": t16,
                    "bf16_speedup": pc.paired_ratio(times["float32"], times["bf16_autocast"]),
                    "float32_tokens_per_s": args.batch / t32,
                    "bf16_tokens_per_s": args.batch / t16,
                    "matmul_gflops_float32": rate32 / 1e9,
                    "matmul_gflops_bf16": rate16 / 1e9,
                    "matmul_n": n,
                    "float32_of_matmul_rate": 6
                    * args.d_in
                    * args.d_sae
                    * args.batch
                    / t32
                    / rate32,
                    **pc.machine(),
                }
            )
    df = pd.DataFrame(rows)
    df["load_1m_before"], df["load_1m_after"] = load_before, pc.load_average()
    out = args.out / f"step_precision_{device.split(':')[0]}.csv"
    pc.write_csv(df, out)
    cols = ["method", "regime", "float32_s", "bf16_autocast_s", "bf16_speedup"]
    print(df[cols].to_string(index=False))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
