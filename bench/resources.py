"""Disk and memory estimates checked before work starts, and disk-full turned into one line.

Why: a run that cannot fit fails late and badly. An SAE too large for RAM dies inside the
allocator with a 25-line traceback; a harvest whose memory map outgrows the disk dies of
SIGBUS with no message at all (a write through a mapping has no return value to carry
ENOSPC). So: estimate what a run will need, compare it with what is free, and refuse
with one line giving both before anything is written; and reserve the blocks a memory map
will touch (``posix_fallocate``) so a disk that fills anyway gives an error, not a signal.

The estimates are deliberately simple upper-ish bounds (documented per function); they
are there to catch "cannot possibly fit", not to predict peak usage to the byte.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from dictbench.errors import UserError

BYTES_PER_ELEMENT = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# [batch, d_sae] float32 tensors alive at once in one SAE step: pre-activations, codes,
# and their gradients. [batch, d_in] ones: input, reconstruction, and their gradients.
_BATCH_WIDE_TENSORS = 4
_BATCH_NARROW_TENSORS = 4


def human(nbytes: float) -> str:
    """1536 -> '1.5 KiB'; for messages."""
    n = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def element_bytes(dtype: str) -> int:
    if dtype not in BYTES_PER_ELEMENT:
        raise UserError(f"unknown dtype '{dtype}' (known: {', '.join(BYTES_PER_ELEMENT)})")
    return BYTES_PER_ELEMENT[dtype]


# --- estimates -------------------------------------------------------------------------


def sae_parameter_count(d_in: int, d_sae: int) -> int:
    """Encoder and decoder matrices plus both biases (the common SAE shape; gated and
    JumpReLU add O(d_sae) vectors, which do not change the order of magnitude)."""
    return 2 * d_in * d_sae + d_sae + d_in


def sae_training_bytes(d_in: int, d_sae: int, batch_size: int, n_saes: int = 1) -> int:
    """Memory to train ``n_saes`` SAEs at once (lockstep): per SAE float32 weights,
    gradients and Adam's two moments (4 copies of the parameters), plus one batch's
    [batch, d_sae] and [batch, d_in] working tensors per SAE."""
    params = sae_parameter_count(d_in, d_sae)
    state = 4 * params * 4
    batch = 4 * batch_size * (_BATCH_WIDE_TENSORS * d_sae + _BATCH_NARROW_TENSORS * d_in)
    return n_saes * (state + batch)


def cache_bytes(n_tokens: int, d_model: int, dtype: str = "float32") -> int:
    """Bytes of one activation-cache entry: tokens x d_model x element size, plus the
    int32 token ids and the float32 mean (small, but counted)."""
    return n_tokens * d_model * element_bytes(dtype) + 4 * n_tokens + 4 * d_model


def checkpoint_bytes(d_in: int, d_sae: int, n_saes: int = 1) -> int:
    """Output folder: per SAE a training checkpoint (weights and two Adam moments) while it
    trains, and the final weights; a checkpoint is written beside the previous one before
    replacing it, so two can exist at once."""
    params = sae_parameter_count(d_in, d_sae)
    return n_saes * 4 * params * (2 * 3 + 1)


# --- what is available -----------------------------------------------------------------


def _existing_ancestor(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def free_disk_bytes(path: str | Path) -> int:
    """Free bytes (for an unprivileged writer) on the filesystem ``path`` is or will be on."""
    return shutil.disk_usage(_existing_ancestor(Path(path))).free


def _cgroup_free() -> int | None:
    """Room left under a cgroup v2 memory limit (containers), or None where unlimited."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    if limit == "max":
        return None
    try:
        return max(0, int(limit) - used)
    except ValueError:
        return None


def available_ram_bytes(meminfo: str = "/proc/meminfo") -> int | None:
    """MemAvailable (the kernel's estimate of memory usable without swapping), capped by a
    cgroup limit where one applies; None where neither can be read (non-Linux)."""
    found: int | None = None
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        found = None
    cg = _cgroup_free() if meminfo == "/proc/meminfo" else None
    if found is None:
        return cg
    return found if cg is None else min(found, cg)


def available_gpu_bytes(device: str) -> int | None:
    """Free memory on a CUDA device (torch's view), or None for CPU or where unknown."""
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.device(device).index
    free, _total = torch.cuda.mem_get_info(torch.cuda.current_device() if index is None else index)
    return int(free)


# --- checks ----------------------------------------------------------------------------


def require_disk(what: str, path: str | Path, needed: int, free: int | None = None) -> None:
    """Refuse (one line, estimate and availability) when ``needed`` bytes will not fit."""
    free = free_disk_bytes(path) if free is None else free
    if needed > free:
        raise UserError(
            f"not enough disk for {what} in '{path}': needs about {human(needed)} "
            f"({needed} bytes), {human(free)} free"
        )


def require_memory(
    what: str, needed: int, device: str = "cpu", available: int | None = None
) -> None:
    """Refuse when ``needed`` bytes exceed free RAM (CPU) or free GPU memory (cuda)."""
    if available is None:
        available = (
            available_gpu_bytes(device) if device.startswith("cuda") else available_ram_bytes()
        )
    if available is None:
        return  # cannot tell on this platform: let the allocator decide
    where = "GPU memory" if device.startswith("cuda") else "RAM"
    if needed > available:
        raise UserError(
            f"not enough {where} for {what}: needs about {human(needed)} ({needed} bytes), "
            f"{human(available)} available"
        )


def check_sae_memory(d_in: int, d_sae: int, batch_size: int, n_saes: int, device: str) -> int:
    """The SAE training estimate, refused where it cannot fit; returns the estimate."""
    needed = sae_training_bytes(d_in, d_sae, batch_size, n_saes)
    plural = "s" if n_saes != 1 else ""
    require_memory(
        f"{n_saes} SAE{plural} of d_sae {d_sae} on d_in {d_in} (batch {batch_size})",
        needed,
        device,
    )
    return needed


# --- disk full mid-run -----------------------------------------------------------------


def _enospc(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def preallocate(target: int | str | Path, nbytes: int, path: str | Path | None = None) -> None:
    """Reserve ``nbytes`` for a file (an open fd, or a path) so that writing it later,
    through a memory map included, cannot run out of space. Where the filesystem cannot
    preallocate (EOPNOTSUPP/EINVAL, e.g. some network filesystems) it does nothing; a
    full disk is a ``UserError`` naming the path and the bytes."""
    if nbytes <= 0 or not hasattr(os, "posix_fallocate"):
        return
    name = str(path if path is not None else target)
    fd = target if isinstance(target, int) else os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as e:
        if _enospc(e):
            raise UserError(
                f"disk full: cannot reserve {human(nbytes)} ({nbytes} bytes) for '{name}' "
                f"({human(free_disk_bytes(Path(name).parent))} free); free some space "
                "and rerun with --resume"
            ) from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        if not isinstance(target, int):
            os.close(fd)


@contextlib.contextmanager
def disk_full_is_user_error(path: str | Path, nbytes: int | None = None) -> Iterator[None]:
    """``with disk_full_is_user_error(path, n): write...`` - ENOSPC (or a quota) becomes
    one line naming ``path`` (and the bytes, where known); other errors pass through."""
    try:
        yield
    except OSError as e:
        if not _enospc(e):
            raise
        size = f" {human(nbytes)} ({nbytes} bytes)" if nbytes is not None else ""
        raise UserError(
            f"disk full: cannot write{size} to '{path}' ({human(free_disk_bytes(path))} "
            "free); free some space and rerun with --resume"
        ) from None
