"""On-disk activation cache: harvest once per fingerprint, memory-map thereafter.

A cache entry (``dictbench.data.cache_entry``: its identity, files and checks) is built in a
temporary folder and renamed into place only when complete, so a killed harvest never
leaves an entry that looks usable; a damaged entry found on reuse is rebuilt. Several
processes harvesting the same entry (shards of a sweep, ranks, machines sharing the
cache folder) take turns on a lock file, so it is harvested once and opened by all.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

try:
    import fcntl
except ImportError:  # pragma: no cover - no fcntl on Windows: abandoned folders stay
    fcntl = None  # type: ignore[assignment]

from dictbench import faults, resources
from dictbench.data.cache_entry import (  # noqa: F401 - re-exported: importers use these names
    CACHE_DTYPES,
    SAMPLE_WINDOWS,
    ActivationStore,
    CacheDamaged,
    acts_sample_sha256,
    acts_sha256,
    default_cache_root,
    discard,
    fingerprint,
    from_float32,
    to_float32,
)
from dictbench.data.corpus import CorpusSpec, keep_positions, make_windows
from dictbench.errors import UserError
from dictbench.io import atomic

HARVEST_LOCK = ".harvesting"
# acts.npy is hashed in full up to this size (about 1-4 s of SHA-256 per open on a
# laptop-class CPU; the quickstart's training entry is 1.2 GB). Larger entries hash a
# fixed sample of windows: cheap to re-check on every open, and any truncation or
# resize is still caught by the shape and file-size checks.
FULL_HASH_MAX_BYTES = 2 << 30


def _acts_checksums(acts: np.ndarray) -> dict[str, Any]:
    if acts.nbytes <= FULL_HASH_MAX_BYTES:
        return {"acts": acts_sha256(acts)}
    return {"acts_sample": acts_sample_sha256(acts), "acts_sample_windows": SAMPLE_WINDOWS}


def _hold_harvest_lock(tmp: Path) -> int | None:
    """flock a file inside a harvest's temporary folder for as long as the harvest runs:
    the kernel drops it when the process dies, which marks the folder as abandoned."""
    if fcntl is None:
        return None
    fd = os.open(tmp / HARVEST_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _remove_abandoned_harvests(root: Path, prefix: str, log: Any) -> None:
    """Delete temporary harvest folders of this entry whose process died mid-harvest.

    Folders without the lock file (or where it is still held) are left alone: they
    may belong to a harvest that is running right now.
    """
    if fcntl is None or not root.is_dir():
        return
    for tmp in root.glob(prefix + "*"):
        lock = tmp / HARVEST_LOCK
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(fd)
        log(f"activation cache: removed {tmp}, left by a harvest that was interrupted")


@dataclass
class PendingHarvest:
    """A harvest whose token windows are chosen (so corpus errors surface) but not yet run."""

    final: Path
    fingerprint: str
    ident: dict[str, Any]
    tokens: np.ndarray
    part: str


def lookup(
    subject: Any, hook: str, request: EntryRequest, root: Path, log: Any = print
) -> ActivationStore | None:
    """The cached store for ``request`` if a finished, intact one exists; None otherwise.
    It reads no corpus: asking costs nothing even when the answer is no."""
    final, fp, ident, _ = _entry_identity(subject, hook, request, root)
    return _reuse(final, request.part, fp, ident, log)


def prepare(
    subject: Any, hook: str, request: EntryRequest, root: Path, log: Any = print
) -> ActivationStore | PendingHarvest:
    """The cached store if one exists, else the windows to harvest.

    Split out from :func:`harvest` so a run can fail on a too-short corpus before it
    writes anything.
    """
    final, fp, ident, n_windows = _entry_identity(subject, hook, request, root)
    store = _reuse(final, request.part, fp, ident, log)
    if store is not None:
        return store
    tokens = make_windows(subject.tokenizer, request.corpus, request.part, n_windows, request.seed)
    return PendingHarvest(final, fp, ident, tokens, request.part)


def _entry_identity(
    subject: Any, hook: str, request: EntryRequest, root: Path
) -> tuple[Path, str, dict[str, Any], int]:
    """(entry folder, fingerprint, identity, windows) of the entry that would hold ``request``."""
    corpus, part = request.corpus, request.part
    n_windows = -(-request.n_tokens // int(keep_positions(corpus.ctx_len).sum()))
    fp, ident = fingerprint(
        subject.fingerprint(), hook, corpus, part, n_windows, request.seed, request.dtype
    )
    return root / f"{part}-{fp}", fp, ident, n_windows


def _fill_entry(
    tmp: Path, subject: Any, hook: str, pending: PendingHarvest, batch_windows: int
) -> None:
    """Harvest into the temporary folder ``tmp``: arrays, fsync, then meta.json last."""
    tokens, part, fp = pending.tokens, pending.part, pending.fingerprint
    n_windows, ctx = tokens.shape
    keep = keep_positions(ctx)
    d = subject.d_model
    dtype = str(pending.ident.get("dtype", "float32"))
    acts = np.lib.format.open_memmap(
        tmp / "acts.npy", mode="w+", dtype=CACHE_DTYPES[dtype], shape=(n_windows, ctx, d)
    )
    try:  # reserve the mapped blocks: a full disk is then an error here, not a SIGBUS later
        resources.preallocate(tmp / "acts.npy", os.path.getsize(tmp / "acts.npy"))
    except UserError:
        del acts
        (tmp / "acts.npy").unlink(missing_ok=True)  # give the space back at once
        raise
    total = np.zeros(d, dtype=np.float64)
    bar = tqdm(
        total=n_windows * ctx,
        desc=f"harvest {part} @ {hook}",
        unit="tok",
        unit_scale=True,
        mininterval=2.0,
    )
    with torch.inference_mode():
        for start in range(0, n_windows, batch_windows):
            ids = torch.from_numpy(tokens[start : start + batch_windows].astype(np.int64))
            out = subject.run_to(hook, ids).float().cpu().numpy()
            acts[start : start + len(ids)] = from_float32(out, dtype)
            total += out[:, keep].sum(axis=(0, 1), dtype=np.float64)
            bar.update(ids.numel())
            faults.point(f"harvest:{part}:batch={start // batch_windows}")
    bar.close()
    acts.flush()
    acts_sums = _acts_checksums(acts)
    del acts
    np.save(tmp / "tokens.npy", tokens)
    np.save(tmp / "mean.npy", (total / (n_windows * keep.sum())).astype(np.float32))
    for name in ("acts.npy", "tokens.npy", "mean.npy"):
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    meta = {
        **pending.ident,
        "fingerprint": fp,
        "d_model": d,
        "n_tokens": int(n_windows * keep.sum()),
        "checksums": {
            "tokens": atomic.file_sha256(tmp / "tokens.npy"),
            "mean": atomic.file_sha256(tmp / "mean.npy"),
            **acts_sums,
        },
    }
    atomic.write_json(tmp / "meta.json", meta)


def run_harvest(
    subject: Any,
    hook: str,
    pending: ActivationStore | PendingHarvest,
    batch_windows: int = 16,
    log: Any = print,
) -> ActivationStore:
    if isinstance(pending, ActivationStore):
        return pending
    part, final, fp = pending.part, pending.final, pending.fingerprint
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    lock = root / f".{part}-{fp}.lock"
    turn = _wait_for_turn(lock, final, log)
    try:
        # Another process may have harvested it while this one waited for the lock.
        store = _reuse(final, part, fp, pending.ident, log)
        if store is not None:
            return store
        return _harvest_entry(subject, hook, pending, batch_windows, log)
    finally:
        if turn is not None:
            lock.unlink(missing_ok=True)  # while still held, so no one is mid-take-over
            os.close(turn)


def _reuse(final: Path, part: str, fp: str, ident: Any, log: Any) -> ActivationStore | None:
    """The finished entry at ``final`` if it is there and intact; a damaged one is removed."""
    if not final.exists():
        return None
    try:
        store = ActivationStore.open(final, reused=True, expect=(fp, ident))
    except CacheDamaged as e:
        log(f"activation cache: {final} is damaged ({e}); rebuilding it")
        discard(final)
        return None
    log(f"activation cache: reusing {part} activations at {final} (fingerprint {fp})")
    return store


def _wait_for_turn(lock: Path, final: Path, log: Any) -> int | None:
    """flock the entry's lock file, waiting while another process (a second shard of a
    sweep, another rank or machine sharing the cache folder) harvests the same entry:
    the entry is then harvested once and opened by everyone."""
    if fcntl is None:
        return None
    told = False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not told:
                log(f"activation cache: another process is harvesting {final}; waiting for it")
                told = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        # The holder unlinks the file when done: a lock on an unlinked file guards nothing.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _harvest_entry(
    subject: Any, hook: str, pending: PendingHarvest, batch_windows: int, log: Any
) -> ActivationStore:
    part, final, fp = pending.part, pending.final, pending.fingerprint
    root = final.parent
    _remove_abandoned_harvests(root, f".tmp-{part}-{fp}-", log)
    tmp = root / f".tmp-{part}-{fp}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    busy = _hold_harvest_lock(tmp)
    try:
        _fill_entry(tmp, subject, hook, pending, batch_windows)
        if final.exists():
            try:  # a concurrent harvest finished first; theirs is as good as ours
                ActivationStore.open(final, expect=(fp, pending.ident))
            except CacheDamaged:
                discard(final)
        (tmp / HARVEST_LOCK).unlink(missing_ok=True)
        wrote = not final.exists()
        if wrote:
            os.replace(tmp, final)
            atomic.fsync_dir(root)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if busy is not None:
            os.close(busy)
    log(f"activation cache: harvested {part} activations into {final} (fingerprint {fp})")
    # Hashed moments ago from the same pages; shapes and sizes are still checked.
    return ActivationStore.open(final, expect=(fp, pending.ident), checksums=not wrote)


@dataclass(frozen=True)
class EntryRequest:
    """Which activations an entry holds besides the model and hook point: a corpus split
    (``part``), how many tokens of it, the seed that picks its windows, the stored dtype.
    One object because every caller names the five together."""

    corpus: CorpusSpec
    part: str
    n_tokens: int
    seed: int
    dtype: str = "float32"


def harvest(
    subject: Any,
    hook: str,
    request: EntryRequest,
    root: Path,
    batch_windows: int = 16,
    log: Any = print,
) -> ActivationStore:
    """The entry ``request`` names at ``hook``: reused when cached and intact, else harvested."""
    pending = prepare(subject, hook, request, root, log)
    return run_harvest(subject, hook, pending, batch_windows, log)
