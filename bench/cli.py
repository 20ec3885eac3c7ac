"""The `dictbench` command line."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

from dictbench import __version__
from dictbench.allocator import keep_freed_memory
from dictbench.errors import UserError


def _cmd_run(args: argparse.Namespace) -> int:
    from dictbench import runner, spec

    overrides = list(args.set or [])
    if args.out:
        overrides.append(f"out={args.out}")
    if args.resume and args.out and args.spec is None and args.preset is None:
        from dictbench.train import resume

        data = resume.recorded_spec_data(Path(args.out))  # the spec the run folder records
        spec.replace_baselines(data, args.baseline)
        for assignment in overrides:
            spec.apply_override(data, assignment)
        resolved = spec.build(spec.RunSpec, data)
        spec.validate(resolved)
    else:
        resolved = spec.resolve(args.spec, args.preset, overrides, args.baseline)
    if args.seeds is not None:
        if args.seeds < 1:
            raise UserError(f"--seeds: expected a count of at least 1, got {args.seeds}")
        resolved.seeds = list(range(args.seeds))
        spec.validate(resolved)
    shard = _parse_shard(args.shard) if args.shard else None
    from dictbench.train import distributed

    # Under torchrun (WORLD_SIZE > 1) this process is one rank of a data-parallel run.
    distributed.init("cpu" if resolved.synthetic is not None else resolved.model.device)
    try:
        runner.run(resolved, resume=args.resume, shard=shard)
    finally:
        distributed.shutdown()
    return 0


def _parse_shard(text: str) -> tuple[int, int]:
    i, sep, n = text.partition("/")
    try:
        index, count = int(i), int(n)
    except ValueError:
        index, count = -1, 0
    if not sep or count < 1 or not 0 <= index < count:
        raise UserError(f"--shard: expected I/N with 0 <= I < N (e.g. 0/4), got '{text}'")
    return index, count


def _cmd_list(_args: argparse.Namespace) -> int:
    from dictbench import static_names  # names read from source: no torch import

    print("baselines: " + ", ".join(static_names.baseline_names()))
    print("tasks:     " + ", ".join(static_names.task_names()))
    print("presets:   " + ", ".join(static_names.preset_names()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dictbench",
        description="Train sparse autoencoders under one budget and score them with task modules.",
    )
    parser.add_argument("--version", action="version", version=f"dictbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(sub)
    _add_list_parser(sub)

    from dictbench import commands

    for mod_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"dictbench.commands.{mod_info.name}").register(sub)
    return parser


def _add_run_parser(sub: argparse._SubParsersAction) -> None:
    """The `run` subcommand's arguments: the largest subcommand, kept apart from the
    parser's assembly so each reads as one step."""
    p_run = sub.add_parser(
        "run",
        help="harvest activations, train the spec's SAEs, score them, print a leaderboard",
        description="Run a spec end to end. With no SPEC and no --preset, runs the "
        "'quickstart' preset.",
    )
    p_run.add_argument("spec", nargs="?", help="a run spec in YAML (may name a preset to extend)")
    p_run.add_argument("--preset", help="start from this preset (see `dictbench list`)")
    p_run.add_argument("--out", help="output folder (default runs/<spec name>)")
    p_run.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a spec field, e.g. --set budget.train_tokens=100000 (repeatable)",
    )
    p_run.add_argument(
        "--baseline",
        action="append",
        metavar="NAME|MODULE:CLASS",
        help="train this baseline instead of the spec's (repeatable)",
    )
    p_run.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run in its output folder: keep finished SAEs and task "
        "records, continue training from the last checkpoint (same results as an "
        "uninterrupted run); with --out and no SPEC, reuse the spec recorded there",
    )
    p_run.add_argument(
        "--shard",
        metavar="I/N",
        help="train and score only SAEs i, i+N, i+2N, ... of the spec's sweep (0-based), "
        "e.g. one shard per machine over a shared cache_dir; each shard gets its own --out "
        "(default runs/<name>-shard<I>of<N>) and `dictbench leaderboard` merges the shards",
    )
    p_run.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help="train every planned SAE once per seed 0..N-1 (init and token order; the data "
        "split stays from the spec's seed); ids get @seed<N> and the leaderboard shows "
        "each setting's mean and 95%% interval",
    )
    p_run.set_defaults(func=_cmd_run)


def _add_list_parser(sub: argparse._SubParsersAction) -> None:
    """The `list` subcommand: reads names from source, so it is marked as not needing
    torch (main then skips the start-up settings torch reads)."""
    p_list = sub.add_parser(
        "list", help="show registered baselines, tasks and presets", description="List registries."
    )
    p_list.set_defaults(func=_cmd_list, needs_torch=False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    if getattr(args, "needs_torch", True):
        from dictbench import wait_policy

        wait_policy.choose()  # before torch loads: OpenMP reads it once
    try:
        return int(args.func(args))
    except UserError as e:
        # One line whatever the message quotes (a spec value may hold a newline).
        one_line = " ".join(str(e).splitlines())
        print(f"dictbench: error: {one_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dictbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
