"""mkdocs hook: give the API reference a source tree it can read statically.

The ``dictbench`` package is three folders (``bench/``, ``baselines/``, ``tasks/``) mapped
together by ``[tool.setuptools.package-dir]``; griffe, which mkdocstrings uses to read
docstrings, follows folders, not that mapping. This builds ``build/docs-src/dictbench``:
links to ``bench/``'s entries plus ``baselines`` and ``tasks``, which ``mkdocs.yml`` names
in the handler's ``paths``. Nothing is copied and nothing is imported.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "docs-src" / "dictbench"
MAPPED = {"baselines": ROOT / "baselines", "tasks": ROOT / "tasks"}


def build_tree() -> None:
    if TREE.exists():
        shutil.rmtree(TREE)
    TREE.mkdir(parents=True)
    for entry in sorted((ROOT / "bench").iterdir()):
        if entry.name != "__pycache__":
            os.symlink(entry, TREE / entry.name)
    for name, target in MAPPED.items():
        os.symlink(target, TREE / name)


def on_startup(**_: object) -> None:
    build_tree()


build_tree()
