"""`dictbench check`: regression-test a run against a committed reference run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ("terminal", "markdown", "csv", "json")


def _run(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from dictbench.report import check

    table = check.load_tolerances(args.tolerances)
    table = check.apply_flags(table, args.abs_tol, args.rel_tol, args.ignore)
    df = check.compare(args.run, args.reference, table, allow_mixed=args.allow_mixed)
    if args.noise_k is not None:
        from dictbench.report import noise_check

        df = noise_check.apply(df, args.reference, args.noise_k)
    if args.format == "csv":
        sys.stdout.write(df.to_csv(index=False))
    elif args.format == "json":
        sys.stdout.write(df.to_json(orient="records", indent=2) + "\n")
    else:
        print(
            tabulate(
                check.display(df),
                headers="keys",
                tablefmt="github" if args.format == "markdown" else "simple",
                showindex=False,
                disable_numparse=True,
            )
        )
        print()
    # The verdict goes to stderr in machine formats, so stdout stays loadable.
    out = sys.stdout if args.format in ("terminal", "markdown") else sys.stderr
    print(check.summary(df, args.reference), file=out)
    return 1 if len(check.failures(df)) else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "check",
        help="compare a run to a reference run with per-metric tolerances; exit 1 on a regression",
        description="Compare every metric of every SAE in the reference with the run. A change "
        "in the better direction (higher ce_loss_recovered, lower fvu, relative reconstruction "
        "bias nearer 1, ...) never fails; a change the other way by more than the metric's "
        "tolerance, max(abs, rel * |reference|), is a REGRESSION. Metrics with no better "
        "direction (ce_clean, token counts) fail when they change (CHANGED). An SAE, task or "
        "metric of the reference missing from the run, or an SAE whose training failed in the "
        "run, fails too. Exit status: 0 passed, 1 failed, 2 bad input.",
    )
    p.add_argument("run", type=Path, metavar="RUN", help="the run folder to check")
    p.add_argument(
        "--reference", type=Path, required=True, metavar="REF", help="the reference run folder"
    )
    p.add_argument(
        "--tolerances",
        type=Path,
        metavar="FILE",
        help="YAML: metric -> {abs: X, rel: Y, direction: higher|lower|target1|equal, "
        "ignore: true}; the key 'default' applies to metrics dictbench does not know",
    )
    p.add_argument(
        "--abs-tol", action="append", metavar="METRIC=X", help="absolute tolerance (repeatable)"
    )
    p.add_argument(
        "--rel-tol",
        action="append",
        metavar="METRIC=X",
        help="relative tolerance, a fraction of the reference value (repeatable)",
    )
    p.add_argument("--ignore", action="append", metavar="METRIC", help="skip this metric")
    p.add_argument(
        "--noise-k",
        type=float,
        metavar="K",
        help="with a reference trained with seeds: a metric fails only if its change exceeds "
        "both its tolerance and K times the reference's seed standard deviation",
    )
    p.add_argument(
        "--allow-mixed",
        action="store_true",
        help="compare even when model, hook, corpus split, evaluation tokens or budget differ",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="terminal",
        help="diff table as terminal text, GitHub markdown (for $GITHUB_STEP_SUMMARY), CSV or "
        "JSON (default: terminal)",
    )
    p.set_defaults(func=_run)
