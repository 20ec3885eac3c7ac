"""The house size limits: no source file over 400 lines, no function over 60.

Why: a newcomer reads one file or one function at a time. Past these sizes a module
has more than one job and a function more than one step, and both are split by job
(docs/writing-a-method.md and docs/writing-a-task.md point newcomers at files this
size). The limits hold for the product folders (bench/, baselines/, tasks/); tests
and scripts are not checked.

A function's length runs from its ``def`` line to its last line, docstring and
comments included: they are what a reader reads. Nested functions count inside the
enclosing one and on their own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("bench", "baselines", "tasks")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60

# Functions over the limit in files that other changes own right now (the commands and
# the feature-recovery task); each owner splits its own, and this list shrinks to
# nothing. Keyed "path::qualified name", valued by why it is here.
ALLOWED_LONG_FUNCTIONS: dict[str, str] = {
    "bench/cli.py::build_parser": "63 lines; the CLI is being reworked elsewhere",
    "bench/commands/leaderboard.py::_run": "62 lines; owned by the leaderboard command",
    "tasks/feature_recovery.py::FeatureRecovery.run": "93 lines; owned by its task",
}


def file_lines(text: str) -> int:
    return len(text.splitlines())


def long_functions(text: str, limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """Qualified name -> length in lines of every function longer than ``limit``."""
    out: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    length = (child.end_lineno or child.lineno) - child.lineno + 1
                    if length > limit:
                        out[name] = length
                visit(child, f"{name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(text), "")
    return out


def sources() -> list[Path]:
    return sorted(p for d in CHECKED for p in (ROOT / d).rglob("*.py"))


def test_the_checker_sees_what_it_must():
    """Hand-built sources: a 61-line function and a nested 61-line one are flagged, a
    60-line one and a long class body of short methods are not."""
    body = "\n".join(f"    x{i} = {i}" for i in range(58))
    sixty = f"def ok():\n{body}\n    return 0\n"
    assert file_lines(sixty) == 60
    assert long_functions(sixty) == {}
    sixty_one = f"def too_long():\n{body}\n    y = 1\n    return y\n"
    assert long_functions(sixty_one) == {"too_long": 61}
    nested_body = "\n".join(f"            x{i} = {i}" for i in range(60))
    nested = f"class C:\n    def outer(self):\n        def inner():\n{nested_body}\n"
    assert long_functions(nested) == {"C.outer": 62, "C.outer.inner": 61}
    methods = "".join(f"    def m{i}(self):\n        return {i}\n" for i in range(40))
    assert long_functions(f"class Many:\n{methods}") == {}


def test_the_allow_list_names_only_functions_still_too_long():
    """An entry whose function was split (or renamed) must leave the list."""
    stale = []
    for key in ALLOWED_LONG_FUNCTIONS:
        rel, name = key.split("::")
        path = ROOT / rel
        if not path.is_file() or name not in long_functions(path.read_text()):
            stale.append(key)
    assert not stale, f"no longer over the limit, remove from ALLOWED_LONG_FUNCTIONS: {stale}"


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_source_file_and_function_sizes(path: Path):
    text = path.read_text()
    rel = str(path.relative_to(ROOT))
    n = file_lines(text)
    assert n <= MAX_FILE_LINES, f"{rel}: {n} lines (limit {MAX_FILE_LINES}); split it by job"
    over = {
        name: length
        for name, length in long_functions(text).items()
        if f"{rel}::{name}" not in ALLOWED_LONG_FUNCTIONS
    }
    assert not over, f"{rel}: functions over {MAX_FUNCTION_LINES} lines: {over}"
