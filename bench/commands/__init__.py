"""One module per extra `dictbench` subcommand.

Each module defines ``register(subparsers)`` that adds its parser and sets
``func``; ``dictbench.cli`` discovers them, so adding a command never means
editing the CLI core.
"""

from __future__ import annotations

import argparse


def add_trust_code_flag(p: argparse.ArgumentParser) -> None:
    """The opt-in every command that loads a saved SAE offers (see sae_io.load_sae)."""
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="allow an SAE whose cfg.json names a class outside dictbench (module:Class); "
        "loading it imports that module",
    )
