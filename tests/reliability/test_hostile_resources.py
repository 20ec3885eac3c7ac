"""Resource exhaustion: estimates against closed forms, refusals in one line, and a real
full disk (a small tmpfs, mounted where the tests run as root) under a harvest."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from dictbench import resources
from dictbench.data.cache import EntryRequest, harvest
from dictbench.data.corpus import CorpusSpec
from dictbench.errors import UserError


@pytest.fixture
def small_tmpfs(tmp_path) -> Iterator[callable]:
    """``mount(size_bytes) -> Path`` of a fresh tmpfs; skipped in one line without root."""
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
        )
        if res.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root): disk-full test skipped")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], check=False)


# --- estimates in closed form ----------------------------------------------------------


def test_sae_memory_closed_form():
    # d_in 4, d_sae 8: params 2*4*8 + 8 + 4 = 76; 4 copies x 4 bytes; batch 2: 4 B x 2 x
    # (4*8 + 4*4) = 384; two SAEs
    assert resources.sae_training_bytes(4, 8, 2, n_saes=2) == 2 * (76 * 16 + 384)


def test_cache_bytes_by_dtype():
    assert resources.cache_bytes(1000, 576, "float32") == 1000 * 576 * 4 + 4000 + 4 * 576
    assert resources.cache_bytes(1000, 576, "bfloat16") == 1000 * 576 * 2 + 4000 + 4 * 576
    with pytest.raises(UserError, match="unknown dtype 'int3'"):
        resources.cache_bytes(1, 1, "int3")


def test_meminfo_is_parsed(tmp_path):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:  1000 kB\nMemFree: 10 kB\nMemAvailable:     2048 kB\n")
    assert resources.available_ram_bytes(str(info)) == 2048 * 1024
    info.write_text("garbage\n")
    assert resources.available_ram_bytes(str(info)) is None


def test_memory_refusal_gives_estimate_and_availability():
    with pytest.raises(UserError) as info:
        resources.require_memory("the SAEs", 3 << 30, "cpu", available=1 << 30)
    msg = str(info.value)
    assert "3.0 GiB" in msg and "1.0 GiB available" in msg and "\n" not in msg
    resources.require_memory("the SAEs", 1 << 30, "cpu", available=1 << 30)  # fits: no error


def test_disk_refusal_names_path_estimate_and_free(tmp_path):
    with pytest.raises(UserError, match=r"'.*out'.*needs about 2\.0 KiB \(2048 bytes\), 1\.0 KiB"):
        resources.require_disk("checkpoints", tmp_path / "out", 2048, free=1024)


def test_free_disk_of_a_path_not_yet_created(tmp_path):
    deep = tmp_path / "a" / "b" / "c"
    assert resources.free_disk_bytes(deep) == resources.free_disk_bytes(tmp_path)
    assert not (tmp_path / "a").exists()


# --- a real full disk ------------------------------------------------------------------


def test_preallocate_on_a_full_tmpfs_is_one_line_naming_path_and_bytes(small_tmpfs):
    root = small_tmpfs(1 << 20)
    target = root / "acts.npy"
    with pytest.raises(UserError) as info:
        resources.preallocate(target, 4 << 20)
    msg = str(info.value)
    assert str(target) in msg and "4194304 bytes" in msg and "--resume" in msg
    assert os.statvfs(root).f_bfree * os.statvfs(root).f_frsize > 900_000  # space given back


def test_preallocate_that_fits_reserves_the_blocks(small_tmpfs):
    root = small_tmpfs(4 << 20)
    with open(root / "f", "wb") as fh:
        resources.preallocate(fh.fileno(), 1 << 20, root / "f")
    assert os.path.getsize(root / "f") == 1 << 20
    assert os.stat(root / "f").st_blocks * 512 >= 1 << 20


def test_enospc_wrapper_turns_a_write_into_one_line(small_tmpfs):
    root = small_tmpfs(256 << 10)
    with pytest.raises(UserError, match=r"disk full: cannot write 1\.0 MiB .* to '.*ckpt'"):
        with resources.disk_full_is_user_error(root / "ckpt", 1 << 20):
            (root / "ckpt").write_bytes(b"\0" * (1 << 20))


def test_enospc_wrapper_lets_other_errors_through(tmp_path):
    with pytest.raises(PermissionError):
        with resources.disk_full_is_user_error(tmp_path):
            raise PermissionError(errno.EACCES, "denied")


def test_harvest_onto_a_full_tmpfs_is_an_error_not_sigbus(tiny_llama, tiny_corpus_dir, small_tmpfs):
    """Before preallocation, writing the memory map past the tmpfs size killed the process
    with SIGBUS (exit 135). This runs in-process: a regression crashes the test run."""
    corpus = CorpusSpec(
        name="local", data_files=[str(tiny_corpus_dir / "*.txt")], format="text", ctx_len=16
    )
    n_tokens = 1500  # 100 windows x 16 x d 32 x 4 B = 200 KiB of activations
    root = small_tmpfs(64 << 10)
    with pytest.raises(UserError) as info:
        harvest(
            tiny_llama,
            "resid_post.1",
            EntryRequest(corpus, "train", n_tokens, 0),
            root / "cache",
            log=str,
        )
    msg = str(info.value)
    assert "disk full" in msg and "acts.npy" in msg and "bytes" in msg and "\n" not in msg
    assert not list((root / "cache").rglob("acts.npy"))  # the space was given back
    assert not list((root / "cache").glob("train-*"))  # no finished-looking entry


def test_harvest_succeeds_once_space_is_there(tiny_llama, tiny_corpus_dir, small_tmpfs):
    corpus = CorpusSpec(
        name="local", data_files=[str(tiny_corpus_dir / "*.txt")], format="text", ctx_len=16
    )
    root = small_tmpfs(4 << 20)
    store = harvest(
        tiny_llama, "resid_post.1", EntryRequest(corpus, "train", 1500, 0), root / "c", log=str
    )
    assert np.isfinite(np.asarray(store.acts)).all()
