"""Hostile YAML: alias bombs, duplicate keys, empty, binary and runaway files, in specs,
tolerance files and ``--set`` values. Each is one line naming the file (and the line
where there is one), exit code 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dictbench import cli as dictbench_cli
from dictbench.errors import SpecError, UserError
from dictbench.io import safe_yaml
from dictbench.report import check
from dictbench.spec import resolve

# Nine levels of nine-fold aliases: 9**9 (387 million) list items once expanded.
ALIAS_BOMB = textwrap.dedent(
    """\
    preset: smoke
    task_options:
      sparsity:
        a: &a ["x","x","x","x","x","x","x","x","x"]
        b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
        c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
        d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
        e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
        f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
        g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
        h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
        i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
    """
)


def _one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = dictbench_cli.main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("dictbench: error: "), err
    return err[0]


def test_alias_bomb_under_task_options_is_refused_at_once(tmp_path):
    """Before the guarded loader this hung (no output after 200 s): run it in a child
    with a timeout so a regression fails instead of hanging the suite."""
    spec = tmp_path / "bomb.yaml"
    spec.write_text(ALIAS_BOMB)
    code = (
        "import sys\nfrom dictbench.spec import resolve\nfrom dictbench.errors import UserError\n"
        f"try:\n    resolve({str(spec)!r})\nexcept UserError as e:\n    print(e); sys.exit(2)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "aliases" in res.stdout and "line 5" in res.stdout and str(spec) in res.stdout


def test_duplicate_top_level_key_names_key_and_both_lines(tmp_path, capsys):
    spec = tmp_path / "dup.yaml"
    spec.write_text("preset: smoke\nseed: 1\nname: a\nseed: 2\n")
    line = _one_line_error(capsys, ["run", str(spec), "--out", str(tmp_path / "out")])
    assert "duplicate key 'seed'" in line and "line 4" in line and "line 2" in line
    assert not (tmp_path / "out").exists()


def test_duplicate_nested_key_is_refused(tmp_path):
    spec = tmp_path / "dup.yaml"
    spec.write_text("preset: smoke\nbudget:\n  d_sae: 64\n  lr: 0.1\n  d_sae: 128\n")
    with pytest.raises(SpecError, match=r"line 5: duplicate key 'd_sae' \(first given on line 3"):
        resolve(str(spec))


def test_empty_spec_file_is_named_empty_not_missing_baselines(tmp_path, capsys):
    spec = tmp_path / "empty.yaml"
    spec.write_text("")
    line = _one_line_error(capsys, ["run", str(spec), "--out", str(tmp_path / "out")])
    assert "empty" in line and str(spec) in line and "baseline" not in line


def test_comment_only_spec_is_empty_too(tmp_path):
    spec = tmp_path / "c.yaml"
    spec.write_text("# nothing here yet\n\n   \n")
    with pytest.raises(SpecError, match="empty"):
        resolve(str(spec))


def test_binary_spec_file_is_one_line(tmp_path, capsys):
    spec = tmp_path / "model.yaml"
    spec.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    line = _one_line_error(capsys, ["run", str(spec), "--out", str(tmp_path / "out")])
    assert str(spec) in line and ("UTF-8" in line or "NUL" in line)


def test_latin1_spec_names_the_byte_offset(tmp_path):
    spec = tmp_path / "l1.yaml"
    spec.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(SpecError, match="byte offset 9"):
        resolve(str(spec))


def test_a_folder_given_as_spec_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no such file|folder"):
        resolve(str(tmp_path))


def test_merge_keys_are_refused(tmp_path):
    spec = tmp_path / "m.yaml"
    spec.write_text("preset: smoke\nbudget:\n  <<: {d_sae: 64}\n")
    with pytest.raises(SpecError, match="merge keys"):
        resolve(str(spec))


def test_deep_nesting_is_one_line_not_a_recursion_traceback():
    text = "a: " + "[" * 5000 + "]" * 5000 + "\n"
    with pytest.raises(UserError) as info:
        safe_yaml.loads(text, "deep.yaml")
    assert "\n" not in str(info.value) and "deep.yaml" in str(info.value)


def test_oversized_file_is_refused_before_parsing(tmp_path, monkeypatch):
    monkeypatch.setattr(safe_yaml, "MAX_BYTES", 1000)
    spec = tmp_path / "big.yaml"
    spec.write_text("x: " + "y" * 2000 + "\n")
    with pytest.raises(UserError, match="too large"):
        safe_yaml.load_path(spec)


def test_syntax_error_is_one_line_with_line_and_column():
    with pytest.raises(UserError) as info:
        safe_yaml.loads("a: [1, 2\nb: 3\n", "s.yaml")
    msg = str(info.value)
    assert "\n" not in msg and "line" in msg and "column" in msg


def test_set_override_with_an_alias_is_refused():
    with pytest.raises(SpecError, match="--set seed"):
        resolve(None, "smoke", ["seed=*x"])


def test_plain_yaml_still_loads_identically():
    text = "a: 1\nb: [x, {c: 2.5}]\nd: null\ne: true\n"
    assert safe_yaml.loads(text, "t") == {"a": 1, "b": ["x", {"c": 2.5}], "d": None, "e": True}


def test_anchor_without_alias_is_harmless():
    assert safe_yaml.loads("a: &x 1\nb: 2\n", "t") == {"a": 1, "b": 2}


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("fvu: {abs: 0.1}\nfvu: {abs: 0.2}\n", "duplicate key 'fvu'"),
        ("a: &t {abs: 0.1}\nb: *t\n", "aliases"),
        ("", "empty"),
    ],
)
def test_tolerance_files_use_the_same_guard(tmp_path, text, fragment):
    path = tmp_path / "tol.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=fragment) as info:
        check.load_tolerances(Path(path))
    assert "--tolerances" in str(info.value) and "\n" not in str(info.value)
