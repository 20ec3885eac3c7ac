"""`dictbench eval`: score one saved SAE (dictbench's or SAELens's) with dictbench's tasks."""

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

    evaluate.evaluate(
        args.path,
        spec_path=args.spec,
        preset=args.preset,
        overrides=list(args.set or []),
        tasks=args.tasks,
        out=args.out,
        sae_id=args.sae_id,
        mean_tokens=args.mean_tokens,
        trust_code=args.trust_code,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score a saved SAE (dictbench or SAELens folder) with dictbench's tasks",
        description="Score one SAE folder holding sae_weights.safetensors and cfg.json, saved "
        "by dictbench (runs/<run>/saes/<id>) or by SAELens (standard, gated, topk, jumprelu). "
        "The spec defaults to the one recorded with the SAE, else the quickstart preset at "
        "the SAE's hook. Pickle/.pt files are refused: unpickling can run code.",
    )
    p.add_argument("path", metavar="PATH", help="the SAE folder")
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
