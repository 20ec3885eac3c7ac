"""Checks that need no weights come before the model load: hook name and range (from the
config alone), corpus files (present, text: file and byte offset named), output folder
(writable, not locked), judge settings, SAE memory. Each is one line; nothing written."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from dictbench import preflight
from dictbench.data import gguf_header
from dictbench.data import subject as subject_mod
from dictbench.errors import UserError
from dictbench.io.lock import LOCK_NAME, RunLock
from dictbench.spec import RunSpec, build, validate

HOLD = """
import sys, time
from pathlib import Path
from dictbench.io.lock import RunLock
lock = RunLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def tiny_spec(tiny_spec_data):
    def make(**edits):
        data = dict(tiny_spec_data)
        for key, value in edits.items():
            node = data
            *parents, last = key.split("__")
            for p in parents:
                node[p] = dict(node[p])
                node = node[p]
            node[last] = value
        spec = build(RunSpec, data)
        validate(spec)
        return spec

    return make


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load during a pre-load check is a test failure."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(subject_mod.SubjectModel, "load", classmethod(refuse))


def test_the_tiny_spec_passes_and_writes_nothing(tiny_spec, tmp_path, no_model_load):
    out = tmp_path / "runs" / "x"
    preflight.check_before_model_load(tiny_spec(), out)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("hook", ["resid_mid.3", "resid_post", "resid_post.-1", "RESID_POST.1"])
def test_malformed_hook_is_refused_before_load(tiny_spec, tmp_path, no_model_load, hook):
    with pytest.raises(UserError, match="is not a hook point"):
        preflight.check_before_model_load(tiny_spec(hook=hook), tmp_path / "out")


def test_hook_out_of_range_from_the_config_alone(tiny_spec, tmp_path, no_model_load):
    # tiny:llama has num_hidden_layers 3 (tests/conftest.py)
    with pytest.raises(UserError, match=r"layer 3 is out of range .* 3 layers \(0\.\.2\)"):
        preflight.check_before_model_load(tiny_spec(hook="resid_pre.3"), tmp_path / "out")


def test_embedded_gguf_header_gives_30_layers_of_width_576():
    path = os.path.join(subject_mod.embedded_model_folder(), subject_mod._GGUF_FILE)
    assert gguf_header.layer_count_and_width(path) == (30, 576)


def _gguf(tmp_path: Path, kv: list[tuple[str, int, bytes]], version: int = 3) -> Path:
    body = b"GGUF" + struct.pack("<IQQ", version, 0, len(kv))
    for key, vtype, raw in kv:
        body += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + raw
    path = tmp_path / "m.gguf"
    path.write_bytes(body)
    return path


def test_gguf_header_reader_on_a_hand_built_file(tmp_path):
    arch = b"phi"
    strings = struct.pack("<IQ", 8, 2) + b"".join(
        struct.pack("<Q", len(s)) + s for s in (b"tok1", b"tok22")
    )
    path = _gguf(
        tmp_path,
        [
            ("general.architecture", 8, struct.pack("<Q", len(arch)) + arch),
            ("tokenizer.ggml.tokens", 9, strings),
            ("phi.block_count", 4, struct.pack("<I", 7)),
            ("phi.embedding_length", 10, struct.pack("<Q", 96)),
        ],
    )
    assert gguf_header.layer_count_and_width(path) == (7, 96)


@pytest.mark.parametrize("raw", [b"", b"GGML\x00\x00", b"GGUF\x03\x00\x00\x00\x00"])
def test_gguf_header_reader_rejects_truncated_or_foreign_files(tmp_path, raw):
    path = tmp_path / "bad.gguf"
    path.write_bytes(raw)
    with pytest.raises(UserError, match="cannot read GGUF metadata"):
        gguf_header.metadata(path)


def test_corpus_glob_matching_nothing(tiny_spec, tmp_path, no_model_load):
    spec = tiny_spec(corpus__data_files=[str(tmp_path / "nothing" / "*.txt")])
    with pytest.raises(UserError, match="no file matches"):
        preflight.check_before_model_load(spec, tmp_path / "out")


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"good text\n" * 100 + b"\xff\xfe rest", "invalid byte at byte offset 1000"),
        (b"text then \x00\x01\x02 binary", "NUL byte at byte offset 10"),
        ("caf\u00e9".encode()[:-1], "truncated character at byte offset 3"),
        (b"ab" + "\u20ac".encode()[:2], "truncated character at byte offset 2"),
    ],
)
def test_undecodable_corpus_file_names_file_and_offset(
    tiny_spec, tiny_corpus_dir, tmp_path, no_model_load, raw, fragment
):
    bad = tmp_path / "corpus" / "bad.txt"
    bad.parent.mkdir()
    bad.write_bytes(raw)
    files = [str(tiny_corpus_dir / "*.txt"), str(bad)]
    with pytest.raises(UserError, match=fragment) as info:
        preflight.check_before_model_load(tiny_spec(corpus__data_files=files), tmp_path / "o")
    assert str(bad) in str(info.value)


def test_offset_is_right_across_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "_CHUNK", 7)
    path = tmp_path / "x.txt"
    path.write_bytes("\u00e9".encode() * 10 + b"\xc3(")  # the é pairs straddle chunk edges
    with pytest.raises(UserError, match="byte offset 20"):
        preflight.check_text_file(path)


def test_out_is_an_existing_file(tiny_spec, tmp_path, no_model_load):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(UserError, match="cannot write to .*exists and is not a folder"):
        preflight.check_before_model_load(tiny_spec(), tmp_path / "out")


def test_out_under_a_read_only_filesystem(tiny_spec, tmp_path, no_model_load):
    ro = tmp_path / "ro"
    ro.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)])
    if res.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        with pytest.raises(UserError, match="cannot write to"):
            preflight.check_before_model_load(tiny_spec(), ro / "runs" / "x")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_a_held_lock_is_refused_before_the_model_load(tiny_spec, tmp_path, no_model_load):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=f"pid {proc.pid}.*another --out|another dictbench"):
            preflight.check_before_model_load(tiny_spec(), out)
    finally:
        proc.kill()
        proc.wait()
    # the probe leaves the holder's file alone, and a free folder is not refused
    assert (out / LOCK_NAME).exists()
    preflight.check_before_model_load(tiny_spec(), out)


def test_the_lock_probe_creates_no_lock_file(tiny_spec, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    preflight.check_not_locked(out)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("url", ["localhost:8000", "ftp://h/v1", "http:///v1", "http://h:99999/v1"])
def test_bad_judge_url_is_refused_before_load(tiny_spec, tmp_path, no_model_load, url):
    spec = tiny_spec(
        tasks=["autointerp"], task_options={"autointerp": {"model": "m", "base_url": url}}
    )
    with pytest.raises(UserError, match="base_url"):
        preflight.check_before_model_load(spec, tmp_path / "out")


def test_d_sae_a_billion_is_refused_with_estimate_and_availability(
    tiny_spec, tmp_path, no_model_load
):
    spec = tiny_spec(budget__d_sae=1_000_000_000)
    with pytest.raises(UserError) as info:
        preflight.check_before_model_load(spec, tmp_path / "out")
    msg = str(info.value)
    # d_in 32: 4 copies x 4 bytes x (2*32*1e9 + 1e9 + 32) + batch 256 x 4 B x (4e9 + 128)
    expected = 16 * (2 * 32 * 10**9 + 10**9 + 32) + 4 * 256 * (4 * 10**9 + 4 * 32)
    assert f"({expected} bytes)" in msg and "available" in msg and "RAM" in msg
    assert not (tmp_path / "out").exists()


def test_planned_d_saes_count_sweeps(tiny_spec):
    spec = tiny_spec(
        baselines=[
            {"method": "l1", "sweep": {"l1_coefficient": [1, 2, 3]}},
            {"method": "topk", "sweep": {"k": [4, 8], "lr": [1e-3, 1e-4]}},
        ]
    )
    assert preflight.planned_d_saes(spec) == [64] * (3 + 2 * 2)


def test_the_run_holds_its_folder_lock_while_the_model_loads(tiny_spec, tmp_path, monkeypatch):
    """Two runs started together into one folder: the lock is taken before the model
    load, so the second is refused at once rather than after its own load."""
    from dictbench import runner

    out = tmp_path / "out"
    seen = {}

    def load_and_look(*a, **k):
        seen["lock"] = json.loads((out / LOCK_NAME).read_text())
        with pytest.raises(UserError, match="another"):
            RunLock(out).acquire()  # what a second run would meet now
        raise KeyboardInterrupt  # stop here: nothing else of the run is under test

    monkeypatch.setattr(subject_mod.SubjectModel, "load", classmethod(load_and_look))
    spec = tiny_spec()
    spec.out = str(out)
    with pytest.raises(KeyboardInterrupt):
        runner.run(spec)
    assert seen["lock"]["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()  # released on the way out
