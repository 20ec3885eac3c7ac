"""`dictbench export`: write a dictbench SAE in another library's on-disk layout."""

from __future__ import annotations

import argparse

from dictbench.commands import add_trust_code_flag

FORMATS = ("saelens",)


def _run(args: argparse.Namespace) -> int:
    from dictbench.io import saelens

    out = saelens.export(args.sae_dir, args.out, trust_code=args.trust_code)
    print(f"wrote {args.format} SAE to {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a saved SAE in SAELens's layout (sae_weights.safetensors + cfg.json)",
        description="Convert a dictbench SAE folder (e.g. runs/quickstart/saes/l1) into a "
        "SAELens folder that SAELens 5 and 6 load with SAE.load_from_disk (l1 and l1_april "
        "become 'standard', gated 'gated', topk 'topk', jumprelu and batchtopk 'jumprelu', "
        "e2e 'standard'). Methods with no SAELens equivalent are refused.",
    )
    p.add_argument("sae_dir", metavar="SAE_DIR", help="a dictbench SAE folder")
    p.add_argument(
        "--format", choices=FORMATS, default="saelens", help="target layout (default: saelens)"
    )
    p.add_argument("out", metavar="OUT", help="folder to create (must not exist, or be empty)")
    add_trust_code_flag(p)
    p.set_defaults(func=_run)
