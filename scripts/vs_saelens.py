"""One SAE training step, dictbench against SAELens, interleaved in one process.

Both sides get the same weights, the same batch (d_in 576, d_sae 4608, 4096 tokens,
float32, CPU) and a full step: loss, backward, the method's gradient and constraint
hooks, Adam. SAELens's step is its trainer's ``_train_step`` body (forward pass,
firing bookkeeping, backward, gradient clipping at norm 1, Adam, zero_grad). A
4096^3 float32 matmul is timed in the same rounds, so each step is also reported as a
fraction of the matmul rate at that moment (FLOPs counted as 6 * d_in * d_sae per
token, the issue's convention). Rounds alternate dictbench, SAELens, matmul; medians.

Two regimes, because a dense implementation costs the same in both and a sparse one
does not: ``init`` (fresh weights, about half the latents fire on each token) and
``trained`` (each encoder bias set so every latent fires on ~1.4% of tokens, L0 ~ 64
of 4608, the sparsity of a trained SAE). TopK fires exactly k either way.

Needs sae-lens (the ``bench`` extra is not enough; ``make bench-setup`` builds a
separate venv with it so it never enters dictbench's runtime environment):

    .venv-bench/bin/python scripts/vs_saelens.py --out results/perf
    .venv-bench/bin/python scripts/vs_saelens.py --device cuda   # -> vs_saelens_cuda.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "benchmarks"))
from bench_helpers import BATCH, D_IN, D_SAE, set_trained_sparsity, train_step  # noqa: E402

from dictbench import registry  # noqa: E402
from dictbench.allocator import keep_freed_memory  # noqa: E402
from dictbench.train.trainer import make_optimizer  # noqa: E402

FLOPS = 6 * D_IN * D_SAE * BATCH


def saelens_sae(method: str, device: str):
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    common = dict(d_in=D_IN, d_sae=D_SAE, dtype="float32", device=device)
    if method == "l1":
        return StandardTrainingSAE(
            StandardTrainingSAEConfig(apply_b_dec_to_input=True, l1_coefficient=5.0, **common)
        ), {"l1": 5.0}
    if method == "gated":
        return GatedTrainingSAE(GatedTrainingSAEConfig(l1_coefficient=5.0, **common)), {"l1": 5.0}
    if method == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=32, **common)), {}
    raise ValueError(method)


def saelens_step(sae, opt, batch: torch.Tensor, coeffs: dict, step: int) -> float:
    from sae_lens.saes.sae import TrainStepInput

    sae.train()
    out = sae.training_forward_pass(
        step_input=TrainStepInput(
            sae_in=batch,
            coefficients=coeffs,
            dead_neuron_mask=None,
            n_training_steps=step,
            is_logging_step=False,
        )
    )
    with torch.no_grad():  # the trainer's per-step firing statistics
        firing = out.feature_acts.bool().float()
        did_fire = firing.sum(-2).bool()
        since = getattr(sae, "_since_fired", None)
        sae._since_fired = (torch.zeros(D_SAE, device=batch.device) if since is None else since) + 1
        sae._since_fired[did_fire] = 0
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    return float(out.loss.detach())


def build(method: str, regime: str, batch: torch.Tensor):
    torch.manual_seed(0)
    cls = registry.get_baseline(method)
    ours = cls(cls.config_class(d_in=D_IN, d_sae=D_SAE)).to(batch.device)
    ours.train()
    ours.on_train_start(1000, batch)
    if regime == "trained":
        set_trained_sparsity(ours, batch)
    theirs, coeffs = saelens_sae(method, str(batch.device))
    with torch.no_grad():
        mine = dict(ours.named_parameters())
        for name, p in theirs.named_parameters():
            p.copy_(mine[name])
    # lr 0: every round repeats the same work (the same latents fire).
    # Each library's own optimiser: dictbench's trainer uses Adam's fused kernel where
    # torch has one; SAELens's trainer builds a plain torch.optim.Adam.
    opt_ours = make_optimizer(ours.parameters(), 0.0, (0.9, 0.999))
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=0.0)
    return ours, opt_ours, theirs, opt_theirs, coeffs


def timed(fn: Callable[..., object], *args: object) -> float:
    """Wall time of one call; on CUDA the device is synchronised on both sides."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    fn(*args)
    sync()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/perf", help="folder for vs_saelens.csv")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds per case")
    ap.add_argument("--methods", nargs="+", default=["l1", "gated", "topk"])
    ap.add_argument("--device", default="cpu", help="cpu (the issue's setting) or cuda")
    ap.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's mmap-per-large-tensor default (both sides; the CLI does not)",
    )
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))  # what timed() synchronises
    tuned = False if args.system_malloc else keep_freed_memory()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(BATCH, D_IN, generator=g) * 0.9 + 0.3).to(args.device)
    a, b = (torch.randn(4096, 4096, device=args.device) for _ in range(2))
    rows = []
    for method in args.methods:
        for regime in ["init"] if method == "topk" else ["init", "trained"]:
            ours, oo, theirs, ot, coeffs = build(method, regime, batch)
            with torch.no_grad():
                l0 = float((ours.encode(batch) > 0).float().sum(-1).mean())
            train_step(ours, oo, batch, 10**6)
            saelens_step(theirs, ot, batch, coeffs, 10**6)
            t_ours, t_theirs, t_mm = [], [], []
            for _ in range(args.rounds):
                t_ours.append(timed(train_step, ours, oo, batch, 10**6))
                t_theirs.append(timed(saelens_step, theirs, ot, batch, coeffs, 10**6))
                t_mm.append(timed(torch.mm, a, b))
            mo, mt, mm = (statistics.median(v) for v in (t_ours, t_theirs, t_mm))
            rate = 2 * 4096**3 / mm
            row = {
                "method": method,
                "regime": regime,
                "l0": round(l0, 1),
                "dictbench_s": round(mo, 4),
                "saelens_s": round(mt, 4),
                "speedup": round(mt / mo, 3),
                "matmul_gflops": round(rate / 1e9, 1),
                "dictbench_frac_of_matmul": round(FLOPS / mo / rate, 3),
                "saelens_frac_of_matmul": round(FLOPS / mt / rate, 3),
                "freed_memory_kept": tuned,
                "device": torch.cuda.get_device_name() if batch.is_cuda else "cpu",
            }
            print(row, flush=True)
            rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kind = args.device.split(":")[0]
    name = "vs_saelens.csv" if kind == "cpu" else f"vs_saelens_{kind}.csv"
    tmp = out / f"{name}.tmp"
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / name)


if __name__ == "__main__":
    main()
