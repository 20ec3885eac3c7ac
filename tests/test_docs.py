"""The documentation's cheap invariants, without building the site (that needs the docs
extra; `make lint` and `.ci/run` run `mkdocs build --strict`).

- README.md stays short (at most 250 lines) and every relative link in it resolves.
- Every page in mkdocs.yml's nav exists under docs/.
- Paths that test files cite (``bench/...py``, ``tasks/...py``, ...) exist, so a moved
  module cannot leave a test pointing at nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
# A repository path in prose: a top-level source folder, then a file name with a suffix.
# The look-behind skips paths inside a longer one ("runs/bench/x.py" cites nothing).
CITED = re.compile(
    r"(?<![\w./-])((?:bench|baselines|tasks|tests|scripts)/[\w./-]*?\w\.(?:py|yaml))"
)


def relative_links(text: str) -> list[str]:
    """Targets of markdown links that point into the repository (not URLs, not anchors)."""
    return [t for t in LINK.findall(text) if "://" not in t and not t.startswith("mailto:")]


def nav_pages(nav: object) -> list[str]:
    """Every page path in an mkdocs nav (nested lists of {title: page-or-list})."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in nav_pages(value)]
    return []


def cited_paths(text: str) -> list[str]:
    return CITED.findall(text)


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_readme_links_resolve() -> None:
    targets = relative_links((ROOT / "README.md").read_text())
    docs = [t for t in targets if t.startswith("docs/")]
    assert len(docs) >= 10  # the README is a map of the docs
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert missing == []


def test_readme_names_the_docs_build_and_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    for command in ("make quickstart", "make test", "make docs"):
        assert command in text


def test_every_nav_page_exists() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = nav_pages(config["nav"])
    assert "index.md" in pages and "metrics.md" in pages
    missing = [p for p in pages if not (ROOT / "docs" / p).is_file()]
    assert missing == []


def test_test_files_cite_real_paths() -> None:
    stale = []
    for f in sorted((ROOT / "tests").rglob("*.py")):
        if f.name == Path(__file__).name:
            continue  # this file's pattern examples are made up on purpose
        for path in cited_paths(f.read_text()):
            if not (ROOT / path).exists():
                stale.append(f"{f.relative_to(ROOT)}: {path}")
    assert stale == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("see bench/faults.py for the crash points", ["bench/faults.py"]),
        ("(tasks/base.py) and baselines/l1.py.", ["tasks/base.py", "baselines/l1.py"]),
        ("runs/bench/x.py and dictbench/faults.py", []),
        ("presets in bench/presets/smoke.yaml", ["bench/presets/smoke.yaml"]),
    ],
)
def test_cited_path_pattern(text: str, expected: list[str]) -> None:
    assert cited_paths(text) == expected


def test_link_and_nav_helpers() -> None:
    text = "[a](docs/x.md) [b](https://e.org/y.md) [c](docs/z.md#part) [d](#local)"
    assert relative_links(text) == ["docs/x.md", "docs/z.md"]
    nav = [{"Home": "index.md"}, {"Group": [{"A": "a.md"}, "b.md"]}]
    assert nav_pages(nav) == ["index.md", "a.md", "b.md"]
