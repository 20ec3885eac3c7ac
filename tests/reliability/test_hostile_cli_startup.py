"""First contact stays cheap: `--help`, every subcommand's `--help` and `list` import no
heavy library (an invariant checked in a fresh process, not a timing), and `list` reads
the same names the registries hold."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dictbench import registry, static_names

HEAVY = ("torch", "transformers", "pandas", "numpy", "datasets", "openai", "matplotlib")
COMMANDS = [
    ["--help"],
    ["list"],
    ["run", "--help"],
    ["check", "--help"],
    ["eval", "--help"],
    ["export", "--help"],
    ["leaderboard", "--help"],
]

PROBE = """
import json, sys
from dictbench import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = [m for m in {heavy!r} if m in sys.modules]
print(json.dumps({{"code": code, "heavy": heavy}}), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_help_and_list_import_nothing_heavy(argv):
    res = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(res.stderr.strip().splitlines()[-1])
    assert report["code"] in (0, None), res.stderr
    assert report["heavy"] == [], f"{' '.join(argv)} imported {report['heavy']}"
    assert res.stdout.strip()


def test_list_names_equal_the_registries():
    assert static_names.baseline_names() == registry.baseline_names()
    assert static_names.task_names() == registry.task_names()


def test_ast_scan_reads_plain_and_annotated_names():
    src = (
        "@register_baseline\nclass A:\n    name = 'alpha'\n"
        "@registry.register_baseline\nclass B:\n    name: ClassVar[str] = 'beta'\n"
        "class C:\n    name = 'not registered'\n"
    )
    assert static_names.names_in_source(src, "register_baseline") == ["alpha", "beta"]


def test_a_computed_name_is_not_guessed():
    src = "@register_task\nclass T:\n    name = 'x' + 'y'\n"
    with pytest.raises(static_names.NotStatic):
        static_names.names_in_source(src, "register_task")


def test_a_computed_name_falls_back_to_the_registry(monkeypatch):
    def boom(kind):
        raise static_names.NotStatic("computed")

    monkeypatch.setattr(static_names, "builtin_names", boom)
    assert static_names.baseline_names() == registry.baseline_names()
    assert static_names.task_names() == registry.task_names()


def test_entry_point_baselines_are_listed_by_name(monkeypatch):
    monkeypatch.setattr(static_names, "entry_point_baseline_names", lambda: ["zz_plugin"])
    assert "zz_plugin" in static_names.baseline_names()


def test_decorator_used_as_a_call_is_not_cut_out_but_refused(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "a.py").write_text(
        "from dictbench.registry import register_task\n\n\n"
        "@register_task\nclass A:\n    name = 'a'\n\n    def f(self):\n        pass\n\n\n"
        "class B:\n    name = 'b'\n\n\nregister_task(B)\n"
    )
    monkeypatch.setattr(static_names, "_package_dir", lambda package: pkg)
    with pytest.raises(static_names.NotStatic):
        static_names.builtin_names("tasks")
    (pkg / "a.py").write_text(
        "from dictbench.registry import register_task\n\n\n"
        "@register_task\nclass A:\n    name = 'a'\n\n    def f(self):\n        pass\n\n\n"
        "@register_task\n# a comment\nclass B(A):\n    name: str = 'b'\n"
    )
    assert static_names.builtin_names("tasks") == ["a", "b"]
