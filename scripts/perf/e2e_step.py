"""e2e SAE training step: cached hook-point activations vs re-running the whole model.

dictbench's e2e baseline (baselines/e2e.py) trains from cached hook-point activations:
each step runs only the layers after the hook, twice (a no-grad clean pass and the
spliced pass with activation gradients) through the trainer's DownstreamHandle. The
reference does what e2e_sae does: every step runs the whole model from tokens, once
clean without gradients and once with the SAE spliced in by a forward hook at the hook
point, then backpropagates. Same SAE weights, same windows, same loss, same optimiser
and training step; the script checks that both losses and gradients agree, then times
both interleaved in one process (each side keeps training its own copy, so both follow
the same trajectory).

    python scripts/perf/e2e_step.py                  # ~2-3 min on 2 cores
    python scripts/perf/e2e_step.py --hooks resid_post.6 --rounds 3
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
from dictbench.baselines.base import LossOutput  # noqa: E402
from dictbench.data.corpus import CorpusSpec, keep_positions, make_windows  # noqa: E402
from dictbench.score.divergence import kl_clean_to_sae  # noqa: E402
from dictbench.train.trainer import DownstreamHandle, SequenceBatch  # noqa: E402

CTX, D_IN, D_SAE = 128, 576, 4608


class WholeModel:
    """What an e2e_sae step needs: the whole model from tokens, with an optional splice."""

    def __init__(self, subject: Any, hook: str, scale: float):
        self.subject, self.scale = subject, scale
        self.layer = subject.layers[subject.stream_position(hook) - 1]

    def logits(self, ids: torch.Tensor, splice: Any = None) -> torch.Tensor:
        if splice is None:
            return self.subject.model(input_ids=ids, use_cache=False).logits

        def hook(_m: Any, _i: Any, out: Any) -> Any:
            h = out[0] if isinstance(out, tuple) else out
            new = splice(h * self.scale) / self.scale  # the SAE works in training units
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handle = self.layer.register_forward_hook(hook)
        try:
            return self.subject.model(input_ids=ids, use_cache=False).logits
        finally:
            handle.remove()


def whole_model_reference(cls: type) -> type:
    """``cls`` (the e2e SAE) with its loss computed e2e_sae's way; nothing else changed."""

    class WholeModelE2E(cls):  # type: ignore[misc, valid-type]
        whole: WholeModel

        def loss(self, batch: SequenceBatch, step: int) -> LossOutput:
            ids = batch.token_ids
            with torch.no_grad():
                lp_clean = torch.log_softmax(self.whole.logits(ids), -1)
            latents: dict[str, torch.Tensor] = {}

            def splice(x: torch.Tensor) -> torch.Tensor:
                spliced, latents["f"] = self.splice(x, batch.keep)
                return spliced

            lp_sae = torch.log_softmax(self.whole.logits(ids, splice), -1)
            kl = kl_clean_to_sae(lp_clean[:, 1:], lp_sae[:, 1:])
            f = latents["f"]
            l1, penalty = self.sparsity(f, step)
            total = self.cfg.kl_coefficient * kl + penalty
            terms = {"kl": kl.detach(), "l1": l1.detach()}
            return LossOutput(total, terms, f.detach().reshape(-1, f.shape[-1]))

    return WholeModelE2E


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    try:
        from dictbench.train.trainer import make_optimizer as trainer_opt
    except ImportError:
        return torch.optim.Adam(params, lr=1e-4)
    return trainer_opt(params, 1e-4, (0.9, 0.999))


def build(subject: Any, hook: str, method: str, ids: torch.Tensor) -> tuple[Any, ...]:
    with torch.no_grad():
        acts = subject.run_to(hook, ids).float()
    scale = float((D_IN / acts[:, 1:].pow(2).sum(-1).mean()).sqrt())
    batch = SequenceBatch(acts * scale, ids, torch.from_numpy(keep_positions(CTX)))
    cls = registry.get_baseline(method)
    cfg = cls.config_class(d_in=D_IN, d_sae=D_SAE)
    sample = batch.acts[:, 1:].reshape(-1, D_IN)
    torch.manual_seed(0)
    ours = cls(cfg)
    ours.train()
    ours.on_train_start(1000, sample)
    ours.downstream = DownstreamHandle(subject, hook, scale)
    ref = whole_model_reference(cls)(cfg)
    ref.train()
    ref.on_train_start(1000, sample)
    ref.load_state_dict(ours.state_dict())
    ref.whole = WholeModel(subject, hook, scale)
    return batch, ours, ref


def agreement(ours: Any, ref: Any, batch: SequenceBatch) -> dict[str, float]:
    losses, grads = [], []
    for m in (ours, ref):
        m.zero_grad(set_to_none=True)
        out = m.loss(batch, 0)
        out.total.backward()
        losses.append(float(out.total.detach()))
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
        m.zero_grad(set_to_none=True)
    worst = max(
        float((grads[0][n] - grads[1][n]).abs().max() / grads[1][n].abs().max().clamp_min(1e-30))
        for n in grads[1]
    )
    return {
        "loss_rel_diff": abs(losses[0] - losses[1]) / abs(losses[1]),
        "grad_max_rel_diff": worst,
    }


def time_both(ours: Any, ref: Any, batch: SequenceBatch, rounds: int) -> tuple[dict, dict]:
    """Interleaved training steps; each side trains its own copy with its own Adam."""
    opts = {
        "dictbench_cached": make_optimizer(ours.parameters()),
        "whole_model": make_optimizer(ref.parameters()),
    }
    models = {"dictbench_cached": ours, "whole_model": ref}
    step = dict.fromkeys(models, 0)
    losses: dict[str, list[float]] = {k: [] for k in models}

    def runner(name: str) -> Any:
        def run() -> None:
            losses[name].append(train_step(models[name], opts[name], batch, step[name]))
            step[name] += 1

        return run

    times = pc.interleaved({k: runner(k) for k in models}, rounds=rounds, warmup=1)
    return times, losses


def measure(args: Any, subject: Any) -> list[dict[str, Any]]:
    windows = make_windows(subject.tokenizer, CorpusSpec(ctx_len=CTX), "train", args.windows, 0)
    ids = torch.from_numpy(windows.astype(np.int64))
    rows = []
    for hook in args.hooks:
        batch, ours, ref = build(subject, hook, args.method, ids)
        agree = agreement(ours, ref, batch)
        print(f"{hook}: {agree}")
        if agree["loss_rel_diff"] > 1e-4 or agree["grad_max_rel_diff"] > 1e-3:
            raise SystemExit(f"{hook}: dictbench and the whole-model reference disagree: {agree}")
        load0 = pc.load_average()
        times, losses = time_both(ours, ref, batch, args.rounds)
        load1 = pc.load_average()
        drift = max(
            abs(a - b) / abs(b)
            for a, b in zip(losses["dictbench_cached"], losses["whole_model"], strict=True)
        )
        n_tok = int(ids.numel())
        for what, ts in times.items():
            rows.append(
                {
                    "hook": hook,
                    "method": args.method,
                    "what": what,
                    "tokens_per_step": n_tok,
                    "median_s": pc.median(ts),
                    "min_s": min(ts),
                    "tokens_per_s": n_tok / pc.median(ts),
                    "speedup_vs_whole_model": pc.paired_ratio(times["whole_model"], ts),
                    "loss_rel_diff_step0": agree["loss_rel_diff"],
                    "grad_max_rel_diff_step0": agree["grad_max_rel_diff"],
                    "loss_max_rel_diff_all_steps": drift,
                    "rounds": len(ts),
                    "load_1m_before": load0,
                    "load_1m_after": load1,
                    "times_s": ";".join(f"{t:.4f}" for t in ts),
                    **pc.machine(),
                }
            )
    return rows


def plot(df: pd.DataFrame, path: Path, note: str) -> None:
    fig, ax = pc.new_figure(width=6.0, height=4.2)
    hooks = list(dict.fromkeys(df.hook))
    x = np.arange(len(hooks))
    for i, (what, colour) in enumerate(
        [("whole_model", "#999999"), ("dictbench_cached", "#2ca02c")]
    ):
        d = [df[(df.hook == h) & (df.what == what)].iloc[0] for h in hooks]
        xs = x + (i - 0.5) * 0.38
        ax.bar(xs, [r.median_s for r in d], 0.38, color=colour, label=what.replace("_", " "))
        if what == "dictbench_cached":
            for xi, r in zip(xs, d, strict=True):
                ax.text(
                    xi,
                    r.median_s,
                    f"{r.speedup_vs_whole_model:.2f}x faster",
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
    ax.set_xticks(x, hooks)
    ax.set_ylabel(f"seconds per step ({int(df.tokens_per_step.iloc[0])} tokens, median)")
    ax.set_title(
        f"{df.method.iloc[0]} training step: cached activations vs whole model", fontsize=9
    )
    ax.legend(fontsize=8)
    fig.suptitle(note, fontsize=6)
    pc.write_png(fig, path)


def main(argv: list[str] | None = None) -> None:
    p = pc.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--hooks", nargs="+", default=["resid_post.6", "resid_post.15"])
    p.add_argument("--method", default="e2e", choices=["e2e"], help="the e2e baseline")
    p.add_argument("--windows", type=int, default=2, help="windows of 128 tokens per step")
    p.add_argument("--rounds", type=int, default=4, help="timed steps per side (after 1 warm-up)")
    args = p.parse_args(argv)
    pc.setup_threads(args.threads)
    load0 = pc.load_average()
    subject = pc.load_embedded_model()
    df = pd.DataFrame(measure(args, subject))
    note = pc.footer(load0, pc.load_average())
    args.out.mkdir(parents=True, exist_ok=True)
    pc.write_csv(df, args.out / "e2e_step.csv")
    plot(df, args.out / "e2e_step.png", note)
    print(
        df[
            [
                "hook",
                "what",
                "median_s",
                "tokens_per_s",
                "speedup_vs_whole_model",
                "loss_max_rel_diff_all_steps",
            ]
        ].to_string(index=False)
    )
    print(note)


if __name__ == "__main__":
    main()
