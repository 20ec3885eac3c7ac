"""Downstream evaluation: dictbench's ``downstream`` task against SAEBench's way.

dictbench (tasks/downstream.py) starts from the cached hook-point activations, stacks
the variants into one batch and runs only the layers after the hook; the zero- and
mean-ablated losses do not depend on the SAE and are memoised once per run. The
reference is SAEBench's way: four full forward passes of the whole model from tokens
(clean; spliced, where a forward hook replaces the hook point's output with the SAE's
reconstruction; zero-ablated; mean-ablated), with position 0 kept as dictbench keeps it.
Both compute the same CE losses and KL, and the script checks they agree.

Timed in one process, interleaved: the reference, dictbench for one SAE in a fresh run
(all four variants, the ablations included: ``cold``), and dictbench for a further SAE
of the same run (clean + spliced only: ``warm``). A run of N SAEs costs
cold + (N - 1) warm, so the amortised per-SAE cost is (cold + (N - 1) warm) / N.

    python scripts/perf/downstream.py                    # ~4 min on 2 cores
    python scripts/perf/downstream.py --hooks resid_post.15 --windows 4 --rounds 2
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import perf_common as pc  # noqa: E402

from dictbench import registry  # noqa: E402
from dictbench.data.cache import EntryRequest, harvest  # noqa: E402
from dictbench.data.corpus import CorpusSpec  # noqa: E402
from dictbench.tasks.base import TaskEnv  # noqa: E402

CTX, D_SAE, SEQS_PER_BATCH = 128, 4608, 4


def make_env(subject: Any, hook: str, n_windows: int, root: Path) -> TaskEnv:
    """The task environment a run builds: cached eval activations, the training mean.

    The mean comes from the eval entry itself here: its value does not change the cost,
    and both sides use the same one."""
    store = harvest(
        subject,
        hook,
        EntryRequest(CorpusSpec(ctx_len=CTX), "eval", n_windows * (CTX - 1), 0),
        root,
        log=lambda _m: None,
    )
    return TaskEnv(
        eval_acts=store.acts,
        eval_token_ids=store.tokens,
        keep_positions=store.keep,
        train_mean=np.asarray(store.mean),
        hook=hook,
        subject=subject,
        device="cpu",
        options={"downstream": {"seqs_per_batch": SEQS_PER_BATCH}},
    )


def untrained_l1() -> torch.nn.Module:
    torch.manual_seed(0)
    cls = registry.get_baseline("l1")
    return cls(cls.config_class(d_in=576, d_sae=D_SAE)).eval()


@torch.no_grad()
def saebench_way(subject: Any, env: TaskEnv, sae: torch.nn.Module) -> dict[str, float]:
    """Four full forward passes from tokens per batch; the hook point is replaced in place."""
    keep = torch.from_numpy(env.keep_positions)
    mean = torch.from_numpy(np.asarray(env.train_mean, dtype=np.float32))
    layer = subject.layers[subject.stream_position(env.hook) - 1]
    ids_all = torch.from_numpy(np.asarray(env.eval_token_ids)).long()
    replace: dict[str, Any] = {"fn": None}

    def hook_fn(_m: Any, _i: Any, out: Any) -> Any:
        if replace["fn"] is None:
            return None
        h = out[0] if isinstance(out, tuple) else out
        h = h.clone()
        h[:, keep] = replace["fn"](h[:, keep])
        return (h, *out[1:]) if isinstance(out, tuple) else h

    def sae_fn(h: torch.Tensor) -> torch.Tensor:
        return sae(h.reshape(-1, h.shape[-1])).reshape(h.shape)

    variants = {
        "clean": None,
        "sae": sae_fn,
        "zero": lambda h: torch.zeros_like(h),
        "mean": lambda h: mean.expand_as(h),
    }
    nll = dict.fromkeys(variants, 0.0)
    kl_sum, n_pred = 0.0, 0
    handle = layer.register_forward_hook(hook_fn)
    try:
        for s in range(0, len(ids_all), SEQS_PER_BATCH):
            ids = ids_all[s : s + SEQS_PER_BATCH]
            targets = ids[:, 2:]
            lps = {}
            for name, fn in variants.items():
                replace["fn"] = fn
                logits = subject.model(input_ids=ids, use_cache=False).logits
                lp = torch.log_softmax(logits[:, 1:-1].float(), dim=-1)
                tok = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                nll[name] += float(-tok.double().sum())
                if name in ("clean", "sae"):
                    lps[name] = lp
            kl = (lps["clean"].exp() * (lps["clean"] - lps["sae"])).sum(-1)
            kl_sum += float(kl.double().sum())
            n_pred += targets.numel()
    finally:
        handle.remove()
        replace["fn"] = None
    out = {f"ce_{k}": v / n_pred for k, v in nll.items()}
    out["kl"] = kl_sum / n_pred
    return out


def measure(args: Any, subject: Any, root: Path) -> tuple[list[dict[str, Any]], list[dict]]:
    task = registry.get_task("downstream")()
    sae = untrained_l1()
    rows, checks = [], []
    for hook in args.hooks:
        env = make_env(subject, hook, args.windows, root)
        n_pred = int(env.eval_acts.shape[0] * (CTX - 2))
        # Agreement first (untimed): every CE loss and the KL, both ways.
        ours = task.run(sae, env).metrics
        ref = saebench_way(subject, env, sae)
        diffs = {k: abs(ours[k] - ref[k]) for k in ref}
        checks.append(
            {
                "hook": hook,
                **{f"ours_{k}": ours[k] for k in ref},
                **{f"ref_{k}": v for k, v in ref.items()},
                **{f"absdiff_{k}": v for k, v in diffs.items()},
            }
        )
        print(f"{hook}: agreement {diffs}")
        if max(diffs.values()) > args.tolerance:
            raise SystemExit(f"{hook}: dictbench and the reference disagree: {diffs}")

        def cold(env: TaskEnv = env) -> None:
            env.shared.clear()  # a fresh run: this SAE pays for the ablations too
            task.run(sae, env)

        def warm(env: TaskEnv = env) -> None:
            task.run(sae, env)  # ablations memoised by the call before

        load0 = pc.load_average()
        times = pc.interleaved(
            {
                "saebench_4_full_forwards": lambda env=env: saebench_way(subject, env, sae),
                "dictbench_cold": cold,
                "dictbench_warm": warm,
            },
            rounds=args.rounds,
            warmup=1,
        )
        load1 = pc.load_average()
        ref_t, cold_t, warm_t = (times[k] for k in times)
        n = args.n_saes
        amort = [(c + (n - 1) * w) / n for c, w in zip(cold_t, warm_t, strict=True)]
        series = {**times, f"dictbench_amortised_{n}_saes": amort}
        for what, ts in series.items():
            rows.append(
                {
                    "hook": hook,
                    "what": what,
                    "predictions": n_pred,
                    "eval_tokens": int(env.n_eval_tokens),
                    "median_s": pc.median(ts),
                    "min_s": min(ts),
                    "predictions_per_s": n_pred / pc.median(ts),
                    "speedup_vs_saebench": pc.paired_ratio(ref_t, ts),
                    "rounds": len(ts),
                    "load_1m_before": load0,
                    "load_1m_after": load1,
                    "times_s": ";".join(f"{t:.4f}" for t in ts),
                    **pc.machine(),
                }
            )
    return rows, checks


def plot(df: pd.DataFrame, path: Path, note: str) -> None:
    fig, ax = pc.new_figure(width=7.0, height=4.4)
    hooks = list(dict.fromkeys(df.hook))
    whats = list(dict.fromkeys(df.what))
    colours = ["#999999", "#1f77b4", "#6baed6", "#2ca02c"]
    w = 0.8 / len(whats)
    x = np.arange(len(hooks))
    for i, what in enumerate(whats):
        d = [df[(df.hook == h) & (df.what == what)].iloc[0] for h in hooks]
        xs = x + (i - (len(whats) - 1) / 2) * w
        ax.bar(
            xs,
            [r.predictions_per_s for r in d],
            w,
            color=colours[i % 4],
            label=what.replace("_", " "),
        )
        for xi, r in zip(xs, d, strict=True):
            if what != whats[0]:
                ax.text(
                    xi,
                    r.predictions_per_s,
                    f"{r.speedup_vs_saebench:.2f}x",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_xticks(x, hooks)
    ax.set_ylim(top=float(df.predictions_per_s.max()) * 1.3)  # room for the legend
    ax.set_ylabel("predicted tokens per second, per SAE (median)")
    ax.set_title("downstream CE/KL evaluation: dictbench vs four full forwards", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(note, fontsize=6)
    pc.write_png(fig, path)


def main(argv: list[str] | None = None) -> None:
    p = pc.base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--hooks", nargs="+", default=["resid_post.15", "resid_post.6"])
    p.add_argument("--windows", type=int, default=4, help="eval windows of 128 tokens")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (after 1 warm-up)")
    p.add_argument("--n-saes", type=int, default=5, help="SAEs per run for the amortised cost")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |difference| allowed")
    args = p.parse_args(argv)
    pc.setup_threads(args.threads)
    load0 = pc.load_average()
    subject = pc.load_embedded_model()
    with tempfile.TemporaryDirectory(prefix="dictbench-perf-ds-") as tmp:
        rows, checks = measure(args, subject, Path(tmp))
    df = pd.DataFrame(rows)
    note = pc.footer(load0, pc.load_average())
    args.out.mkdir(parents=True, exist_ok=True)
    pc.write_csv(df, args.out / "downstream.csv")
    pc.write_csv(pd.DataFrame(checks), args.out / "downstream_agreement.csv")
    plot(df, args.out / "downstream.png", note)
    print(
        df[["hook", "what", "median_s", "predictions_per_s", "speedup_vs_saebench"]].to_string(
            index=False
        )
    )
    print(note)


if __name__ == "__main__":
    main()
