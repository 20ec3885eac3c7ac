#!/usr/bin/env python3
"""Move bench/'s flat modules into stage sub-packages and rewrite every reference to them.

Usage: python apply_move.py REPO_ROOT [--dry-run] [--ruff PATH]

What it does, in order (layout.py says what goes where):
1. plans the moves from the tree as it is now: an entry already in its stage is skipped,
   a flat module layout.py does not know stays where it is and is listed;
2. computes every file's new text: ``dictbench.X`` -> ``dictbench.<stage>.X`` (imports,
   mock/monkeypatch strings, ``::: dictbench.X`` pages, entry points), ``from dictbench
   import a, b`` split by destination, ``bench/X.py`` paths -> ``bench/<stage>/X.py``,
   and relative imports that a move would break made absolute;
3. ``git mv``s (plain moves outside git) and writes each stage's ``__init__.py``;
4. writes the new texts, then pyproject's package list, the README's two lines and
   tests/test_layout.py (move_extras.py), then lets ruff sort the rewritten imports and
   format the rewritten files that were clean before, and wraps comment or docstring lines
   the longer names pushed over the line limit.

Idempotent: a second run finds nothing to move and nothing to rewrite. Exit 2 with one
line on bad input (no bench/ under the root, a stage name taken by a module).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import layout  # noqa: E402
import move_extras  # noqa: E402

TEXT_SUFFIXES = {".py", ".md", ".yml", ".yaml", ".toml", ".cfg", ".sh", ".ini"}
TEXT_NAMES = {"Makefile"}
SKIP_DIRS = {
    ".git",
    "__pycache__",
    "site",
    "build",
    "runs",
    "node_modules",
    ".ruff_cache",
    ".pytest_cache",
    ".mypy_cache",
    ".hypothesis",
}


def fail(msg: str) -> None:
    print(f"apply_move: {msg}", file=sys.stderr)
    raise SystemExit(2)


def plan(bench: Path) -> tuple[dict[str, str], list[tuple[Path, Path]], list[str]]:
    """(entries to rewrite -> stage, moves still to make, unknown flat modules/folders)."""
    moves = layout.moves()
    for stage in layout.STAGES:
        if (bench / f"{stage}.py").exists():
            fail(f"bench/{stage}.py exists; it would hide the '{stage}' stage package")
    todo = []
    for name, stage in moves.items():
        src_mod, src_dir = bench / f"{name}.py", bench / name
        if src_mod.exists():
            todo.append((src_mod, bench / stage / f"{name}.py"))
        elif src_dir.is_dir() and (src_dir / "__init__.py").exists():
            todo.append((src_dir, bench / stage / name))
    for src, dst in todo:
        if dst.exists():
            fail(f"both {src} and {dst} exist; move one by hand first")
    known = set(moves) | set(layout.TOP_LEVEL) | set(layout.TOP_FOLDERS) | set(layout.STAGES)
    unknown = sorted(
        p.name
        for p in bench.iterdir()
        if p.name not in ("__init__.py", "__pycache__")
        and (p.stem if p.suffix == ".py" else p.name) not in known
        and (p.suffix == ".py" or p.is_dir())
    )
    return moves, todo, unknown


def compile_rules(moves: dict[str, str], folders: set[str]) -> tuple[re.Pattern[str], ...]:
    """The three patterns: dotted import names, module paths, moved-folder paths."""

    def alt(names) -> str:
        return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)) or "(?!)"

    # Not after a word, dot, slash or dash: ".dictbench.lock" (a file name) stays.
    dotted = re.compile(rf"(?<![\w./-])dictbench\.({alt(moves)})\b")
    # "bench/X.py" for a module, "bench/X" for a folder, not inside a longer path.
    module_path = re.compile(rf"(?<![\w./-])bench/({alt(set(moves) - folders)})(?=\.py\b)")
    folder_path = re.compile(rf"(?<![\w./-])bench/({alt(folders)})\b(?!\.py)")
    return dotted, module_path, folder_path


FROM_RE = re.compile(
    r"(?P<lead>^[ \t]*(?:>>> )?|`)from dictbench import "
    r"(?P<body>\((?:[^()]*)\)|[\w ,]+?)(?P<comment>[ \t]*#[^\n]*)?(?=$|`)",
    re.M,
)


def _split_from(match: re.Match[str], moves: dict[str, str], notes: list[str]) -> str:
    """``from dictbench import a, b as c`` grouped by where each name now lives."""
    body = match["body"].strip()
    if body.startswith("("):
        lines = body[1:-1].splitlines()
        if any("#" in ln for ln in lines):
            notes.append(f"comments inside 'from dictbench import (...)' dropped: {body!r}")
        body = " ".join(ln.split("#")[0] for ln in lines)
    items = [i.strip() for i in body.split(",") if i.strip()]
    groups: dict[str, list[str]] = {}
    for item in items:
        dest = moves.get(item.split()[0], "")
        groups.setdefault(dest, []).append(item)
    if set(groups) == {""}:
        return match[0]
    lead, comment = match["lead"], match["comment"] or ""
    if lead == "`" and len(groups) > 1:
        notes.append(f"inline import with names from several stages, left: {match[0]!r}")
        return match[0]
    keep_all = bool(re.search(r"noqa|type:\s*ignore", comment))
    out = []
    for i, (dest, names) in enumerate(groups.items()):
        module = f"dictbench.{dest}" if dest else "dictbench"
        tail = comment if (i == 0 or keep_all) else ""
        out.append(f"{lead}from {module} import {', '.join(names)}{tail}")
    return "\n".join(out)


def absolute_relatives(text: str, package: str, moving: bool, moves: dict[str, str]) -> str:
    """Relative imports whose target would change meaning after the move, made absolute.

    ``package`` is the importing module's package before the move. A relative import
    inside a folder that moves whole (``formats``) keeps working and is left alone."""

    def fix(m: re.Match[str]) -> str:
        dots, rest = m["dots"], m["rest"] or ""
        base = package.split(".")
        if len(dots) > 1:
            base = base[: -(len(dots) - 1)]
        target = ".".join(base + ([rest] if rest else []))
        parts = target.split(".")
        mover = parts[1] if len(parts) > 1 and parts[0] == "dictbench" else None
        own = package.split(".")[1] if package.count(".") >= 1 else None
        if own is not None and mover == own and own in moves:
            return m[0]  # inside a folder that moves whole
        if not (moving or mover in moves or target == "dictbench"):
            return m[0]
        return f"{m['indent']}from {target} import"

    rel = re.compile(r"^(?P<indent>[ \t]*)from (?P<dots>\.+)(?P<rest>[\w.]+)? import", re.M)
    return rel.sub(fix, text)


def rewrite(text: str, moves: dict[str, str], rules, notes: list[str]) -> tuple[str, int]:
    """The text with every reference to a moved entry pointing at its stage, and how many
    references changed."""
    dotted, module_path, folder_path = rules
    count = 0

    def split(m: re.Match[str]) -> str:
        nonlocal count
        out = _split_from(m, moves, notes)
        count += out != m[0]
        return out

    new = FROM_RE.sub(split, text)
    for pattern, fmt in (
        (dotted, "dictbench.{stage}.{name}"),
        (module_path, "bench/{stage}/{name}"),
        (folder_path, "bench/{stage}/{name}"),
    ):
        new, n = pattern.subn(lambda m, f=fmt: f.format(stage=moves[m[1]], name=m[1]), new)
        count += n
    return new, count


def _skipped(name: str) -> bool:
    return name in SKIP_DIRS or name.startswith(".venv") or name.endswith(".egg-info")


def text_files(root: Path) -> list[Path]:
    """Every file whose references the move rewrites (virtual environments, git's own
    folder, build outputs and run folders pruned)."""
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _skipped(d))
        here = Path(folder)
        in_ci = here.relative_to(root).parts[:1] == (".ci",)
        for name in sorted(files):
            p = here / name
            if p.suffix in TEXT_SUFFIXES or name in TEXT_NAMES or in_ci:
                if p.is_file() and not p.is_symlink():
                    out.append(p)
    return out


def package_of(root: Path, path: Path) -> str | None:
    """The import package a .py file belongs to, from pyproject's package-dir."""
    rel = path.relative_to(root).parts
    if path.suffix != ".py" or rel[0] not in layout.PACKAGE_DIRS:
        return None
    return ".".join([layout.PACKAGE_DIRS[rel[0]], *rel[1:-1]])


def new_path(path: Path, todo: list[tuple[Path, Path]]) -> Path:
    for src, dst in todo:
        if path == src:
            return dst
        if src in path.parents:  # a file inside a folder that moves whole
            return dst / path.relative_to(src)
    return path


def compute_texts(root: Path, moves, todo, notes) -> dict[Path, tuple[str, int]]:
    """Old path -> (new text, references changed) for every file the move changes."""
    bench = root / "bench"
    folders = {n for n, s in moves.items() if (bench / n).is_dir() or (bench / s / n).is_dir()}
    rules = compile_rules(moves, folders)
    moving = {src for src, _ in todo}
    out = {}
    for path in text_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        new = text
        pkg = package_of(root, path)
        if pkg is not None:
            is_moving = path in moving or any(src in path.parents for src in moving)
            new = absolute_relatives(new, pkg, is_moving, moves)
        new, n = rewrite(new, moves, rules, notes)
        if new != text:
            out[path] = (new, n)
    return out


def is_tracked(root: Path, path: Path) -> bool:
    if not (root / ".git").exists():
        return False
    res = subprocess.run(
        ["git", "-C", str(root), "ls-files", "--error-unmatch", str(path.relative_to(root))],
        capture_output=True,
    )
    return res.returncode == 0


def do_moves(root: Path, todo: list[tuple[Path, Path]]) -> None:
    for src, dst in todo:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if is_tracked(root, src) or (src.is_dir() and _has_tracked(root, src)):
            subprocess.run(
                [
                    "git",
                    "-C",
                    str(root),
                    "mv",
                    str(src.relative_to(root)),
                    str(dst.relative_to(root)),
                ],
                check=True,
            )
        if src.exists():  # untracked, or untracked files left in a moved folder
            _move_leftovers(src, dst)
        _drop_stale_bytecode(src)


def _has_tracked(root: Path, folder: Path) -> bool:
    res = subprocess.run(
        ["git", "-C", str(root), "ls-files", str(folder.relative_to(root))],
        capture_output=True,
        text=True,
    )
    return bool(res.stdout.strip())


def _move_leftovers(src: Path, dst: Path) -> None:
    if src.is_file():
        shutil.move(str(src), str(dst))
        return
    for p in sorted(src.rglob("*"), reverse=True):
        if "__pycache__" in p.parts:
            continue
        if p.is_file():
            target = dst / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(p), str(target))
    shutil.rmtree(src)


def _drop_stale_bytecode(src: Path) -> None:
    cache = src.parent / "__pycache__"
    if src.suffix == ".py" and cache.is_dir():
        for pyc in cache.glob(f"{src.stem}.*.pyc"):
            pyc.unlink()


def write_inits(bench: Path) -> list[Path]:
    """Each stage's ``__init__.py`` with its paragraph; an existing one is kept as is."""
    made = []
    for stage, (doc, _) in layout.STAGES.items():
        init = bench / stage / "__init__.py"
        if not init.exists():
            init.parent.mkdir(parents=True, exist_ok=True)
            init.write_text(f'"""{doc}\n"""\n', encoding="utf-8")
            print(f"created {init.relative_to(bench.parent)}")
            made.append(init)
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    ap.add_argument("--ruff", default=None, help="ruff executable (default: the one on PATH)")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    bench = root / "bench"
    if not (bench / "__init__.py").is_file():
        fail(f"{root} has no bench/__init__.py; give the repository root")
    moves, todo, unknown = plan(bench)
    notes: list[str] = []
    texts = compute_texts(root, moves, todo, notes)
    for src, dst in todo:
        print(
            f"{'would move' if args.dry_run else 'move'} {src.relative_to(root)} -> "
            f"{dst.relative_to(root)}"
        )
    for path, (_, n) in texts.items():
        print(
            f"{'would rewrite' if args.dry_run else 'rewrite'} {path.relative_to(root)} "
            f"({n} reference(s))"
        )
    if args.dry_run:
        move_extras.report(unknown, notes, [])
        return 0
    ruff = move_extras.Ruff(root, args.ruff)
    py_new = [new_path(p, todo) for p in texts if p.suffix == ".py"]
    before = ruff.clean_before([p for p in texts if p.suffix == ".py"], todo, new_path)
    do_moves(root, todo)
    inits = write_inits(bench)
    for path, (new, _) in texts.items():
        new_path(path, todo).write_text(new, encoding="utf-8")
    fresh = move_extras.apply_extras(root, unknown, inits)
    left = ruff.tidy(py_new + fresh, before, fresh)
    move_extras.report(unknown, notes, left)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
