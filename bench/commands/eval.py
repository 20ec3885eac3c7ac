"""`dictbench eval`: score saved SAEs, from dictbench or elsewhere, with dictbench's tasks."""

from __future__ import annotations

import argparse

from dictbench.commands import add_trust_code_flag


def _tasks(value: str) -> list[str]:
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected task names separated by commas")
    return names


def _run(args: argparse.Namespace) -> int:
    from dictbench import evaluate

    request = evaluate.EvalRequest(
        spec_path=args.spec,
        preset=args.preset,
        overrides=list(args.set or []),
        tasks=args.tasks,
        out=args.out,
        sae_id=args.sae_id,
        mean_tokens=args.mean_tokens,
        trust_code=args.trust_code,
        match=args.match,
    )
    evaluate.evaluate_many(args.paths, request)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score saved SAEs (dictbench, SAELens, sparsify, dictionary_learning, Gemma "
        "Scope; local or on the hub) with dictbench's tasks",
        description="Score one or many SAEs into one run folder. Each PATH is an SAE folder "
        "saved by dictbench, SAELens (standard, gated, topk, jumprelu), sparsify (cfg.json + "
        "sae.safetensors), dictionary_learning (ae.pt + config.json, read with "
        "torch.load(weights_only=True)) or Gemma Scope (params.npz); a glob; a folder of SAE "
        "folders; saelens:RELEASE/SAE_ID or saelens:RELEASE (every SAE, see --match); or "
        "hf://OWNER/REPO/PATH. SAEs at the same model and hook share one set of evaluation "
        "activations and ablated passes. The spec defaults to the one recorded with the SAE, "
        "else the quickstart preset at the SAE's hook (on a release's model). Other "
        "pickles are refused: unpickling can run code.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="SAE folders, globs or hub names")
    p.add_argument(
        "--match",
        metavar="REGEX",
        help="with saelens:RELEASE, score only the SAEs whose id matches this expression",
    )
    p.add_argument(
        "--tasks",
        type=_tasks,
        metavar="T1,T2",
        help="tasks to run, comma-separated (default: the spec's; see `dictbench list`)",
    )
    p.add_argument("--spec", help="a run spec in YAML giving model, hook, corpus and eval size")
    p.add_argument("--preset", help="start from this preset (see `dictbench list`)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a spec field, e.g. --set eval.tokens=16384 (repeatable)",
    )
    p.add_argument("--out", help="output folder (default runs/eval-<sae id>)")
    p.add_argument(
        "--sae-id", help="the id its records carry (default: recorded id or folder name)"
    )
    p.add_argument(
        "--mean-tokens",
        type=int,
        metavar="N",
        help="training tokens for the mean-ablation baseline when the spec's training cache "
        "is absent (default: as many as the evaluation split)",
    )
    add_trust_code_flag(p)
    p.set_defaults(func=_run)
