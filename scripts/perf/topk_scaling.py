"""TopK-family training step time against dictionary size, sparse path vs a dense reference.

dictbench's TopK and BatchTopK train through baselines/sparse_ops.py: one dense matmul
ranks the latents, and everything after it (decoder, its backward, the encoder's
gradient) touches only the k kept latents per token. The reference here is the same
math written densely, as most implementations do: scatter the kept values into a dense
z [B, d_sae], decode with z @ W_dec, and let autograd do the rest. Both sides share the
parameters, the selection, the AuxK term, the dead-latent bookkeeping, the decoder
constraint and the optimiser (one ``train_step`` of tests/benchmarks/bench_helpers.py),
and the script checks that their losses and gradients agree before timing them.

Also timed, to show what is left once the decoder is sparse: the ranking matmul alone
(``(x - b_dec) @ W_enc + b_enc``, the floor of any TopK step) and the per-step
dead-latent bookkeeping (from the kept pairs; it once built a dense latent matrix).

    python scripts/perf/topk_scaling.py                      # ~4-5 min on 2 cores
    python scripts/perf/topk_scaling.py --sizes 2304 4608 --rounds 2   # quick look
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "benchmarks"))

import perf_common as pc  # noqa: E402
from bench_helpers import train_step  # noqa: E402

from dictbench import registry  # noqa: E402
from dictbench.baselines.auxk import auxk_loss  # noqa: E402
from dictbench.baselines.base import LossOutput  # noqa: E402

D_IN, K, BATCH = 576, 32, 4096
SIZES = [2304, 4608, 9216, 18432, 36864]


def dense_reference(cls: type) -> type:
    """``cls`` with its training loss written densely (the common way), nothing else changed."""

    class DenseReference(cls):  # type: ignore[misc, valid-type]
        def loss(self, batch: torch.Tensor, step: int) -> LossOutput:
            pre = self.pre_acts(batch)  # with its graph: autograd forms every gradient
            z = self.sparsify(pre)  # dense [B, d_sae]: the kept values scattered in
            x_hat = z @ self.W_dec + self.b_dec
            mse = (x_hat - batch).pow(2).sum(-1).mean()
            if self.training:
                with torch.no_grad():
                    rows, cols = z.nonzero(as_tuple=True)
                    self.observe(cols, z[rows, cols], z.shape[0])
            aux = auxk_loss(pre, batch - x_hat, self.dead_mask(), self.k_aux, self.W_dec)
            total = mse + self.cfg.aux_coefficient * aux
            return LossOutput(total, {"mse": mse.detach(), "auxk": aux.detach()}, z.detach())

    DenseReference.__name__ = f"Dense{cls.__name__}"
    return DenseReference


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    """The trainer's optimiser where it exposes one, else plain Adam (both sides share it)."""
    try:
        from dictbench.train.trainer import make_optimizer as trainer_opt
    except ImportError:
        return torch.optim.Adam(params, lr=1e-4)
    return trainer_opt(params, 1e-4, (0.9, 0.999))


def build_pair(name: str, d_sae: int, batch: torch.Tensor) -> tuple[Any, Any]:
    """(sparse SAE, dense reference) with identical parameters and buffers, plus optimisers."""
    cls = registry.get_baseline(name)
    cfg = cls.config_class(d_in=D_IN, d_sae=d_sae, k=K)
    torch.manual_seed(0)
    sparse = cls(cfg)
    sparse.train()
    sparse.on_train_start(1000, batch)
    dense = dense_reference(cls)(cfg)
    dense.train()
    dense.on_train_start(1000, batch)
    dense.load_state_dict(sparse.state_dict())
    return (sparse, make_optimizer(sparse.parameters())), (
        dense,
        make_optimizer(dense.parameters()),
    )


def check_agreement(sparse: Any, dense: Any, batch: torch.Tensor) -> dict[str, float]:
    """Loss and gradients of one step, both ways, on copies (the timed models are untouched)."""
    out = {}
    grads = []
    for m in (sparse, dense):
        c = type(m)(m.cfg)
        c.load_state_dict(m.state_dict())
        c.train()
        lo = c.loss(batch, 0)
        lo.total.backward()
        grads.append({n: p.grad.clone() for n, p in c.named_parameters()})
        out.setdefault("loss", []).append(float(lo.total.detach()))
    ls, ld = out["loss"]
    worst = max(
        float((grads[0][n] - grads[1][n]).abs().max() / grads[1][n].abs().max().clamp_min(1e-30))
        for n in grads[1]
    )
    return {"loss_rel_diff": abs(ls - ld) / abs(ld), "grad_max_rel_diff": worst}


def bookkeeping(sae: Any, batch: torch.Tensor) -> Any:
    """The dead-latent bookkeeping of a sparse step (``observe`` on the kept pairs, which
    also gives the trainer its ``LossOutput.fired``)."""
    with torch.no_grad():
        pre = sae.pre_acts(batch)
        rows, cols = sae.select(pre)
        vals = torch.relu(pre[rows, cols])

    def run() -> None:
        sae.observe(cols, vals, batch.shape[0])

    return run


def stepper(sae: Any, opt: torch.optim.Optimizer, batch: torch.Tensor) -> Any:
    """One training step per call, the step counter advancing as in the trainer."""
    steps = iter(range(1, 1_000_000))
    return lambda: train_step(sae, opt, batch, next(steps))


def measure(args: Any) -> pd.DataFrame:
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(BATCH, D_IN, generator=g) * 0.9 + 0.3
    rows = []
    for name in args.methods:
        for d_sae in args.sizes:
            (sparse, opt_s), (dense, opt_d) = build_pair(name, d_sae, batch)
            agree = check_agreement(sparse, dense, batch)
            if agree["loss_rel_diff"] > 1e-4 or agree["grad_max_rel_diff"] > 1e-3:
                raise SystemExit(f"{name} d_sae {d_sae}: sparse and dense disagree: {agree}")
            fns = {"sparse": stepper(sparse, opt_s, batch), "dense": stepper(dense, opt_d, batch)}
            if name == args.methods[0]:
                with torch.no_grad():
                    xc = batch - sparse.b_dec
                fns["ranking_matmul"] = lambda s=sparse, xc=xc: torch.addmm(s.b_enc, xc, s.W_enc)
                fns["bookkeeping"] = bookkeeping(sparse, batch)
            print(f"{name} d_sae {d_sae}: {agree}")
            load0 = pc.load_average()
            times = pc.interleaved(fns, rounds=args.rounds, warmup=1)
            load1 = pc.load_average()
            for impl, ts in times.items():
                rows.append(
                    {
                        "method": name,
                        "impl": impl,
                        "d_sae": d_sae,
                        "d_in": D_IN,
                        "k": K,
                        "batch_tokens": BATCH,
                        "rounds": len(ts),
                        "median_s": pc.median(ts),
                        "min_s": min(ts),
                        "max_s": max(ts),
                        "ratio_to_sparse": pc.paired_ratio(ts, times["sparse"]),
                        "loss_rel_diff": agree["loss_rel_diff"],
                        "grad_max_rel_diff": agree["grad_max_rel_diff"],
                        "load_1m_before": load0,
                        "load_1m_after": load1,
                        "times_s": ";".join(f"{t:.4f}" for t in ts),
                        **pc.machine(),
                    }
                )
            del sparse, dense, opt_s, opt_d, fns
    return pd.DataFrame(rows)


def exponent(df: pd.DataFrame, lo: int = 0) -> float:
    """Slope of log(step time) on log(d_sae) by least squares, over sizes >= lo."""
    d = df[df["d_sae"] >= lo]
    if len(d) < 2:
        return float("nan")
    return float(np.polyfit(np.log(d["d_sae"]), np.log(d["median_s"]), 1)[0])


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (method, impl), d in df.groupby(["method", "impl"], sort=False):
        sizes = sorted(d["d_sae"])
        rows.append(
            {
                "method": method,
                "impl": impl,
                "exponent_all": exponent(d),
                "exponent_upper_half": exponent(d, sizes[len(sizes) // 2]),
                "time_growth": float(d["median_s"].iloc[-1] / d["median_s"].iloc[0]),
                "size_growth": sizes[-1] / sizes[0],
            }
        )
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, fits: pd.DataFrame, path: Path, note: str) -> None:
    fig, ax = pc.new_figure(width=7.0, height=5.0)
    styles = {"sparse": "-o", "dense": "--s", "ranking_matmul": ":^", "bookkeeping": ":v"}
    colours = {"topk": "#1f77b4", "batchtopk": "#ff7f0e"}
    for (method, impl), d in df.groupby(["method", "impl"], sort=False):
        e = fits[(fits.method == method) & (fits.impl == impl)]["exponent_all"].iloc[0]
        label = f"{method} {impl.replace('_', ' ')} (slope {e:.2f})"
        if impl in ("ranking_matmul", "bookkeeping"):
            label = f"{impl.replace('_', ' ')} alone (slope {e:.2f})"
        ax.plot(
            d["d_sae"],
            d["median_s"],
            styles[impl],
            color=colours.get(method, "grey") if impl in ("sparse", "dense") else "grey",
            label=label,
            markersize=4,
        )
    first = df[(df.impl == "sparse")].sort_values("d_sae").iloc[0]
    xs = np.array(sorted(df["d_sae"].unique()), dtype=float)
    ax.plot(xs, first["median_s"] * xs / xs[0], color="black", lw=0.8, label="linear (slope 1)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{int(x):,}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("d_sae (latents)")
    ax.set_ylabel("seconds per training step (median)")
    ax.set_title(f"TopK family step, d_in {D_IN}, k {K}, batch {BATCH}", fontsize=10)
    ax.legend(fontsize=7)
    fig.suptitle(note, fontsize=6)
    pc.write_png(fig, path)


def main(argv: list[str] | None = None) -> None:
    p = pc.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="d_sae values")
    p.add_argument("--methods", nargs="+", default=["topk", "batchtopk"])
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per size (after 1 warm-up)")
    args = p.parse_args(argv)
    pc.setup_threads(args.threads)
    load0 = pc.load_average()
    df = measure(args)
    fits = summarise(df)
    note = pc.footer(load0, pc.load_average())
    args.out.mkdir(parents=True, exist_ok=True)
    pc.write_csv(df, args.out / "topk_scaling.csv")
    pc.write_csv(fits, args.out / "topk_scaling_fit.csv")
    plot(df, fits, args.out / "topk_scaling.png", note)
    cols = ["method", "impl", "d_sae", "median_s", "ratio_to_sparse"]
    print(df[cols].to_string(index=False))
    print(fits.to_string(index=False))
    print(note)


if __name__ == "__main__":
    main()
