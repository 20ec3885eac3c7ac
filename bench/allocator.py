"""Keep freed memory in the process so large CPU tensors do not page-fault every step.

glibc serves every allocation above 32 MiB (its largest mmap threshold) with a fresh
``mmap`` and returns it with ``munmap`` when freed. An SAE step allocates several
[batch, d_sae] float32 tensors (75 MB at 4096 x 4608), so each one is page-faulted in
again on every step: measured on a 2-core EPYC, a fresh 4096 x 576 x 4608 matmul took
184 ms against 124 ms into a reused buffer, and an elementwise add 38 ms against 7 ms.
Turning glibc's mmap path off (``M_MMAP_MAX`` 0) and never trimming the heap top
(``M_TRIM_THRESHOLD``) makes freed blocks reusable, as jemalloc or tcmalloc would.

The cost: the resident size stays near its peak instead of shrinking between phases.
Set ``DICTBENCH_SYSTEM_MALLOC=1`` to keep glibc's defaults. Non-glibc platforms (macOS,
musl) are left alone. The CLI applies this once at start; library users may call
:func:`keep_freed_memory` themselves.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the glibc settings above once; True when they are in force."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("DICTBENCH_SYSTEM_MALLOC", "") not in ("", "0"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _applied
