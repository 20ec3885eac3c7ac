"""One module per extra `dictbench` subcommand.

Each module defines ``register(subparsers)`` that adds its parser and sets
``func``; ``dictbench.cli`` discovers them, so adding a command never means
editing the CLI core.
"""
