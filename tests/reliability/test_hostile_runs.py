"""Whole `dictbench run`s in child processes (the fork server), against hostile setups:
a folder another run holds, a full cache disk, an impossible d_sae, typos that used to
cost a model load. Each: exit 2, one line, no model load where none is needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HOLD = """
import sys, time
from pathlib import Path
from dictbench.io.lock import RunLock
lock = RunLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(120)
"""
LOADING = "loading subject model"


def _spec(tmp_path: Path, data: dict, **edits) -> Path:
    data = yaml.safe_load(yaml.safe_dump(data))
    for key, value in edits.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _one_error_line(res) -> str:
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("dictbench: error: "), lines
    return lines[0]


def test_second_run_into_a_held_folder_is_refused_before_the_model_load(
    tmp_path, tiny_spec_data, cli
):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        spec = _spec(tmp_path, tiny_spec_data)
        res = cli.run(["run", str(spec), "--out", str(out)], tmp_path / "logs", tmp_path / "c")
    finally:
        proc.kill()
        proc.wait()
    line = _one_error_line(res)
    assert "another dictbench run" in line and f"pid {proc.pid}" in line
    assert LOADING not in res.stdout


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("hook", "resid_mid.3", "is not a hook point"),
        ("hook", "resid_post.7", "out of range"),
        ("corpus.data_files", ["/nonexistent/*.txt"], "no file matches"),
        ("budget.d_sae", 1_000_000_000, "not enough RAM"),
    ],
)
def test_typos_fail_before_the_model_load(tmp_path, tiny_spec_data, cli, key, value, fragment):
    spec = _spec(tmp_path, tiny_spec_data, **{key: value})
    out = tmp_path / "out"
    res = cli.run(["run", str(spec), "--out", str(out)], tmp_path / "logs", tmp_path / "c")
    assert fragment in _one_error_line(res)
    assert LOADING not in res.stdout
    assert not out.exists()


def test_binary_corpus_file_is_named_with_offset_before_load(tmp_path, tiny_spec_data, cli):
    bad = tmp_path / "docs" / "blob.txt"
    bad.parent.mkdir()
    bad.write_bytes(b"header ok\n" + bytes(range(128, 256)) * 4)
    spec = _spec(tmp_path, tiny_spec_data, **{"corpus.data_files": [str(bad)]})
    res = cli.run(["run", str(spec), "--out", str(tmp_path / "o")], tmp_path / "l", tmp_path / "c")
    line = _one_error_line(res)
    assert str(bad) in line and "byte offset 10" in line
    assert LOADING not in res.stdout


def test_full_cache_disk_is_one_line_not_sigbus(tmp_path, tiny_spec_data, cli):
    cache = tmp_path / "tmpfs"
    cache.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(cache)]).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): disk-full run skipped")
    try:
        spec = _spec(tmp_path, tiny_spec_data, cache_dir=str(cache / "acts"))
        out = tmp_path / "out"
        res = cli.run(["run", str(spec), "--out", str(out)], tmp_path / "logs", tmp_path / "c")
        line = _one_error_line(res)  # before: SIGBUS, exit 135, no message
        # Refused by the disk estimate before the harvest writes (bench/runner.py); were
        # the estimate passed, the preallocation would say "disk full" instead.
        assert ("not enough disk" in line or "disk full" in line) and "bytes" in line
        assert not list(cache.rglob("acts.npy"))
    finally:
        subprocess.run(["umount", "-l", str(cache)], check=False)


def test_ctrl_c_during_harvest_exits_130_releases_the_lock_and_resumes(
    tmp_path, tiny_spec_data, monkeypatch, capsys
):
    """Ctrl-C arrives as KeyboardInterrupt at a known point (the first harvested batch)."""
    from dictbench import cli as dictbench_cli
    from dictbench import faults
    from dictbench.io.lock import LOCK_NAME

    real_point = faults.point

    def interrupt(name: str) -> None:
        if name == "harvest:train:batch=0":
            raise KeyboardInterrupt
        real_point(name)

    spec = _spec(tmp_path, tiny_spec_data)
    out = tmp_path / "out"
    monkeypatch.setattr(faults, "point", interrupt)
    capsys.readouterr()
    assert dictbench_cli.main(["run", str(spec), "--out", str(out)]) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    # one message, no traceback (a progress bar left open may share its line)
    assert sum(line.endswith("dictbench: interrupted") for line in err) == 1, err
    assert not any("Traceback" in line for line in err)
    assert not (out / LOCK_NAME).exists()  # released on the way out
    cache = Path(tiny_spec_data["cache_dir"])
    assert not list(cache.glob("train-*"))  # no finished-looking cache entry
    monkeypatch.setattr(faults, "point", real_point)
    assert dictbench_cli.main(["run", str(spec), "--out", str(out), "--resume"]) == 0
