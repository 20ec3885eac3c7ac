"""The parts of the move that are not reference rewrites: pyproject's package list, the
README's two lines, tests/test_layout.py, and ruff's tidy-up of the rewritten files.

Each is idempotent: run twice, the second run finds each already in place.
"""

from __future__ import annotations

import ast
import io as _stdio
import json
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import layout

LINE_LIMIT = 100
README_ANCHOR = "`dictbench.tasks`; `results/` holds"
README_MARK = "`bench/<stage>/` = `dictbench.<stage>`"
README_LINES = (
    "Inside `bench/` each stage is a folder and a sub-package, `bench/<stage>/` = "
    "`dictbench.<stage>`:\n"
    "`data`, `train`, `score`, `report`, and `io` under them all; the CLI, spec and registry "
    "stay on top.\n"
)
TEMPLATE = Path(__file__).resolve().parent / "test_layout_template.py.tmpl"


def git_add(root: Path, paths: list[Path]) -> None:
    """New files the move creates join the index, as its ``git mv``s do."""
    if (root / ".git").exists() and paths:
        rel = [str(p.relative_to(root)) for p in paths]
        subprocess.run(["git", "-C", str(root), "add", "--", *rel], check=True)


def update_pyproject(root: Path) -> bool:
    """Each stage package in [tool.setuptools] packages, after "dictbench" itself."""
    path = root / "pyproject.toml"
    text = path.read_text(encoding="utf-8")
    missing = [s for s in layout.STAGES if f'"dictbench.{s}"' not in text]
    if not missing:
        return False
    m = re.search(r'^(?P<indent>[ \t]*)"dictbench",[ \t]*\n', text, re.M)
    if m is None:
        print('pyproject.toml: no "dictbench", line in packages; add the stages by hand:')
        print("  " + ", ".join(f'"dictbench.{s}"' for s in missing))
        return False
    lines = "".join(f'{m["indent"]}"dictbench.{s}",\n' for s in missing)
    path.write_text(text[: m.end()] + lines + text[m.end() :], encoding="utf-8")
    print(f"pyproject.toml: packages += {', '.join('dictbench.' + s for s in missing)}")
    return True


def update_readme(root: Path) -> bool:
    path = root / "README.md"
    text = path.read_text(encoding="utf-8")
    if README_MARK in text:
        return False
    lines = text.splitlines(keepends=True)
    at = next((i for i, ln in enumerate(lines) if README_ANCHOR in ln), None)
    if at is None:
        heading = next((i for i, ln in enumerate(lines) if ln.startswith("## Where things")), None)
        if heading is None:
            print("README.md: no place found; add these lines under 'Where things are':")
            print(README_LINES)
            return False
        at = next((i - 1 for i in range(heading + 2, len(lines)) if not lines[i].strip()), heading)
    lines[at + 1 : at + 1] = [README_LINES]
    path.write_text("".join(lines), encoding="utf-8")
    print("README.md: added the two lines on how bench/'s folders map to dictbench.*")
    return True


def layout_test_text(unknown: list[str]) -> str:
    """tests/test_layout.py from the template, its tables filled from layout.py."""
    q = json.dumps

    def tup(names: tuple[str, ...]) -> str:
        return "(" + ", ".join(map(q, names)) + ("," if len(names) == 1 else "") + ")"

    stages = "".join(f"    {q(s)}: {tup(a)},\n" for s, a in layout.STAGE_IMPORTS.items())
    top = "".join(f"    {q(n)}: {q(k)},\n" for n, k in layout.TOP_LEVEL.items())
    folders = "".join(f"    {q(n)}: {q(k)},\n" for n, k in layout.TOP_FOLDERS.items())
    left = '"entry",  # left at the top by the move: give it a stage'
    for name in unknown:
        if name.endswith(".py"):
            top += f"    {q(name[:-3])}: {left}\n"
        else:
            folders += f"    {q(name)}: {left}\n"
    text = TEMPLATE.read_text(encoding="utf-8")
    for key, value in (("STAGES", stages), ("TOP_LEVEL", top), ("TOP_FOLDERS", folders)):
        text = text.replace(f"    # @{key}@\n", value)
    return text.replace("# @PLUGINS@", tup(layout.PLUGINS))


def write_layout_test(root: Path, unknown: list[str]) -> Path | None:
    path = root / "tests" / "test_layout.py"
    text = layout_test_text(unknown)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return None
    print(f"{'updated' if path.exists() else 'created'} tests/test_layout.py")
    path.write_text(text, encoding="utf-8")
    return path


def apply_extras(root: Path, unknown: list[str], created: list[Path]) -> list[Path]:
    """pyproject, README, the layout test; returns the .py files to tidy with ruff."""
    update_pyproject(root)
    update_readme(root)
    test = write_layout_test(root, unknown)
    new = created + ([test] if test else [])
    git_add(root, new)
    return new


class Ruff:
    """ruff, run from the repository root so that its config applies."""

    def __init__(self, root: Path, exe: str | None) -> None:
        self.root = root
        beside = Path(sys.executable).parent / "ruff"
        self.exe = exe or shutil.which("ruff") or (str(beside) if beside.exists() else None)
        self.known: set[tuple[Path, str, str]] = set()  # findings before the move
        if self.exe is None:
            print("ruff not found: imports are not re-sorted and files not re-formatted")

    def _run(self, *args: str, files: list[Path]) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.exe), *args, *map(str, files)]
        return subprocess.run(cmd, cwd=self.root, capture_output=True, text=True)

    def _findings(self, select: str, files: list[Path]) -> list[dict]:
        res = self._run("check", "--select", select, "--output-format", "json",
                        "--exit-zero", files=files)  # fmt: skip
        return json.loads(res.stdout or "[]")

    def clean_before(self, old: list[Path], todo, new_path) -> dict[str, set[Path]]:
        """Which files (by their path after the move) had sorted imports and were
        formatted before: only those are sorted and formatted after, so a file someone
        left unformatted is not reformatted by the move."""
        if self.exe is None or not old:
            return {"isort": set(), "format": set()}
        unsorted = {Path(f["filename"]).resolve() for f in self._findings("I001", old)}
        res = self._run("format", "--check", "--output-format", "concise", files=old)
        unformatted = set()
        for ln in (res.stdout + res.stderr).splitlines():  # either of ruff's two styles
            m = re.match(r"Would reformat: (.+)$", ln) or re.match(
                r"(.+?):\d+:\d+: unformatted", ln
            )
            if m:
                unformatted.add((self.root / m[1].strip()).resolve())
        res = self._run("check", "--output-format", "json", "--exit-zero", files=old)
        self.known = {
            (new_path(Path(f["filename"]), todo), f["code"], f["message"])
            for f in json.loads(res.stdout or "[]")
        }
        return {
            "isort": {new_path(p, todo) for p in old if p.resolve() not in unsorted},
            "format": {new_path(p, todo) for p in old if p.resolve() not in unformatted},
        }

    def tidy(self, files: list[Path], before: dict[str, set[Path]], fresh: list[Path]) -> list[str]:
        """Sort, format, wrap over-long comment/docstring lines; what ruff still reports."""
        if self.exe is None or not files:
            return []
        sort = [f for f in files if f in before["isort"] or f in fresh]
        fmt = [f for f in files if f in before["format"] or f in fresh]
        if sort:
            self._run("check", "--select", "I001", "--fix", files=sort)
        if fmt:
            self._run("format", files=fmt)
        for _ in range(20):  # a re-flow may push the next line over: fixed in the next round
            long = self._findings("E501", files)
            if not long:
                break
            by_file: dict[Path, list[int]] = {}
            for f in long:
                by_file.setdefault(Path(f["filename"]), []).append(f["location"]["row"])
            for path, rows in by_file.items():
                wrap_long_lines(path, rows)
        res = self._run("check", "--output-format", "json", "--exit-zero", files=files)
        out = []
        for f in json.loads(res.stdout or "[]"):
            where = f"{Path(f['filename']).relative_to(self.root)}:{f['location']['row']}"
            was = (Path(f["filename"]), f["code"], f["message"]) in self.known
            out.append(
                f"{where}: {f['code']} {f['message']}" + (" (already before)" if was else "")
            )
        return out


def _docstring_spans(source: str) -> list[tuple[int, int]]:
    """(first, last) rows of each bare string statement: docstrings, whose text may be
    re-wrapped without changing what the program does."""
    spans = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            if isinstance(node.value.value, str) and node.end_lineno is not None:
                spans.append((node.lineno, node.end_lineno))
    return spans


def _full_line_comments(source: str) -> dict[int, int]:
    """Row -> column of each comment that is alone on its line."""
    out = {}
    for tok in tokenize.generate_tokens(_stdio.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and not tok.line[: tok.start[1]].strip():
            out[tok.start[0]] = tok.start[1]
    return out


_NOT_PROSE = ('"""', "'''", "-", "*", "|", ">>>", "```")


def _continues(line: str, lead: str) -> bool:
    """Whether ``line`` carries on the prose of the line above it at the same ``lead``
    (so the words that do not fit above may start it): not a list item, a closing quote,
    an indented block or a blank."""
    if not line.startswith(lead):
        return False
    body = line[len(lead) :]
    return bool(body.strip()) and not body.startswith(" ") and not body.startswith(_NOT_PROSE)


def _cut_point(lines: list[str], row: int, spans, comments) -> tuple[int, str, int] | None:
    """(where to break, the lead of a continuation line, the last row of its paragraph's
    block) for one over-long comment or docstring line, or None for a code line."""
    line = lines[row - 1].rstrip("\n")
    if row in comments:
        col = comments[row]
        lead, floor, last = line[:col] + "# ", col + 2, row + 1
    else:
        span = next((s for s in spans if s[0] <= row <= s[1]), None)
        if span is None:
            return None
        first_line = lines[span[0] - 1]
        lead = first_line[: len(first_line) - len(first_line.lstrip())]
        floor = len(lead) + 4 if row == span[0] else len(lead)
        last = span[1]
    cut = line.rfind(" ", floor, LINE_LIMIT + 1)
    return (cut, lead, last) if cut > floor else None


def wrap_long_lines(path: Path, rows: list[int]) -> None:
    """Move the words of each over-long comment or docstring line that do not fit to the
    start of the next line of the same paragraph (or onto a new line), so the paragraph
    is re-flowed rather than left with a stub. Code lines are left for ruff to report."""
    source = path.read_text(encoding="utf-8")
    spans, comments = _docstring_spans(source), _full_line_comments(source)
    lines = source.splitlines(keepends=True)
    for row in sorted(set(rows), reverse=True):
        found = _cut_point(lines, row, spans, comments)
        if found is None:
            continue
        cut, lead, last = found
        line = lines[row - 1].rstrip("\n")
        nxt = lines[row].rstrip("\n") if row < len(lines) else ""
        moved = line[cut + 1 :]
        if row < last and _continues(nxt, lead):
            lines[row - 1 : row + 1] = [f"{line[:cut]}\n", f"{lead}{moved} {nxt[len(lead) :]}\n"]
        else:
            lines[row - 1 : row] = [f"{line[:cut]}\n", f"{lead}{moved}\n"]
        print(f"wrapped {path}:{row}")
    path.write_text("".join(lines), encoding="utf-8")


def report(unknown: list[str], notes: list[str], left: list[str]) -> None:
    if unknown:
        print("not in layout.py, left where they are (add them to a stage or TOP_LEVEL):")
        for name in unknown:
            print(f"  bench/{name}")
    for note in notes:
        print(f"hand edit: {note}")
    if left:
        print("ruff reports (those marked 'already before' are not the move's):")
        for ln in left:
            print(f"  {ln}")
    if not (unknown or notes or left):
        print("nothing left to do by hand")
