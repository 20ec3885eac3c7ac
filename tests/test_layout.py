"""Where each module of bench/ lives: one sub-package per stage of a run, imported one way.

Why: bench/ was about sixty flat modules. Grouped by stage (``data``, ``train``,
``score``, ``report``, with ``io`` under them all; ``bench/<stage>/`` is
``dictbench.<stage>``) the folder says what a module is for, and the import direction
says what may depend on what. The tables below are that layout. A module or folder that
no table places, or a stage importing what its row does not allow, fails here with the
file and line, so the layout cannot drift back to flat one module at a time.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

# Stage -> the other stages (or plug-in packages) its modules may import; each may always
# import itself and the "shared" top-level modules.
STAGES: dict[str, tuple[str, ...]] = {
    "io": (),
    "data": ("io",),
    "score": ("io", "data", "tasks"),
    "train": ("io", "data", "score"),
    "report": ("io", "score"),
}
# The other parts of the dictbench package: bench/'s siblings baselines/ and tasks/.
PLUGINS = ("baselines", "tasks")
# The modules that stay at the top of bench/. "shared": any stage may import it.
# "entry": it runs the stages (the CLI, the run and eval orchestration, start-up
# settings), so no stage imports it.
TOP_LEVEL: dict[str, str] = {
    "errors": "shared",
    "faults": "shared",
    "resources": "shared",
    "console": "shared",
    "registry": "shared",
    "spec": "shared",
    "spec_types": "shared",
    "spec_checks": "shared",
    "cli": "entry",
    "runner": "entry",
    "run_plan": "entry",
    "run_info": "entry",
    "run_resume": "entry",
    "preflight": "entry",
    "evaluate": "entry",
    "eval_groups": "entry",
    "group_scoring": "entry",
    "static_names": "entry",
    "allocator": "entry",
    "wait_policy": "entry",
}
# Folders at the top of bench/ that are not stages: the CLI's subcommands, data files.
TOP_FOLDERS: dict[str, str] = {
    "commands": "entry",
    "presets": "data",
    "assets": "data",
}
# What ``from dictbench import X`` may name besides modules: the package's own attributes.
PACKAGE_ATTRS = {"__version__"}


def misplaced(bench: Path) -> list[str]:
    """Each module or folder at the top of ``bench`` that no table places, and each stage
    folder that is not a package."""
    bad = []
    for entry in sorted(bench.iterdir()):
        if entry.name in ("__init__.py", "__pycache__"):
            continue
        if entry.is_dir() and entry.name not in STAGES and entry.name not in TOP_FOLDERS:
            bad.append(f"bench/ has {entry.name}/, a folder in no table")
        elif entry.suffix == ".py" and entry.stem not in TOP_LEVEL:
            bad.append(f"bench/ has {entry.name}, a top-level module in no table")
    for stage in STAGES:
        if not (bench / stage / "__init__.py").is_file():
            bad.append(f"bench/{stage}/ has no __init__.py")
    return bad


def imported(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, name right under ``dictbench``) of each import of dictbench in one module,
    relative ones resolved against ``package`` and imports inside functions included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base == "dictbench":
                targets = [f"dictbench.{alias.name}" for alias in node.names]
            else:
                targets = [base]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            if parts[0] == "dictbench" and len(parts) > 1:
                out.append((node.lineno, parts[1]))
    return out


def forbidden_imports(bench: Path) -> list[str]:
    """Each import, by a module inside a stage, of something its row does not allow (as
    ``<stage>/<module>.py:<line>``, the path inside bench/)."""
    bad = []
    for stage, allowed in STAGES.items():
        for path in sorted((bench / stage).rglob("*.py")):
            package = ".".join(["dictbench", *path.relative_to(bench).parent.parts])
            for line, name in imported(path, package):
                if name == stage or name in allowed or name in PACKAGE_ATTRS:
                    continue
                if TOP_LEVEL.get(name) == "shared":
                    continue
                bad.append(f"{path.relative_to(bench)}:{line}: {stage} imports {name}")
    return bad


def test_every_module_of_bench_sits_in_a_listed_place() -> None:
    assert misplaced(BENCH) == []


def test_stages_import_only_what_their_row_allows() -> None:
    assert forbidden_imports(BENCH) == []


def test_the_stage_table_has_no_cycle() -> None:
    for stage in STAGES:
        seen, todo = set(), list(STAGES[stage])
        while todo:
            other = todo.pop()
            assert other in STAGES or other in PLUGINS, f"{stage} allows unknown {other}"
            assert other != stage, f"{stage} can reach itself through the table"
            if other in STAGES and other not in seen:
                seen.add(other)
                todo.extend(STAGES[other])


def test_each_stage_says_what_it_holds() -> None:
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((BENCH / stage / "__init__.py").read_text()))
        assert doc is not None and len(doc.split()) >= 20, stage


def test_the_checks_catch_a_misplaced_module_and_a_wrong_import(tmp_path: Path) -> None:
    # The real tables decide; the planted tree relies on these rows of them.
    assert STAGES["data"] == ("io",) and "train" in STAGES and "report" in STAGES
    assert TOP_LEVEL["errors"] == "shared" and TOP_LEVEL["runner"] == "entry"
    bench = tmp_path / "bench"
    for folder in (bench, *(bench / s for s in STAGES)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "__init__.py").write_text('"""A package."""\n')
    (bench / "newthing.py").write_text("")
    (bench / "extras").mkdir()
    (bench / "extras" / "x.py").write_text("")
    (bench / "data" / "cache.py").write_text(
        "from dictbench import errors, runner\n"
        "from dictbench.io import atomic\n"
        "from ..train import trainer\n"
        "def f():\n"
        "    import dictbench.report.plots\n"
    )
    assert misplaced(bench) == [
        "bench/ has extras/, a folder in no table",
        "bench/ has newthing.py, a top-level module in no table",
    ]
    assert forbidden_imports(bench) == [
        "data/cache.py:1: data imports runner",
        "data/cache.py:3: data imports train",
        "data/cache.py:5: data imports report",
    ]
