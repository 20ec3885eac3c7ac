"""On-disk activation cache: harvest once per fingerprint, memory-map thereafter.

A cache entry is a folder named by a fingerprint of everything that determines its
contents (model, hook point, corpus split, context length, token count, seed). It
is built in a temporary folder and renamed into place only when complete, so a
killed harvest never leaves an entry that looks usable. Opening an entry checks it
against its meta.json (shapes, dtypes, file sizes, fingerprint, SHA-256 of every
file, or of a fixed sample of activation windows for entries over 2 GiB): a damaged
entry is rebuilt, one written for another fingerprint is refused.
"""

from __future__ import annotations

import hashlib
import json
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

from dictbench import atomic, faults, resources
from dictbench.corpus import CorpusSpec, keep_positions, make_windows
from dictbench.errors import UserError

CACHE_FORMAT = 1
HARVEST_LOCK = ".harvesting"
# acts.npy is hashed in full up to this size (about 1-4 s of SHA-256 per open on a
# laptop-class CPU; the quickstart's training entry is 1.2 GB). Larger entries hash a
# fixed sample of windows: cheap to re-check on every open, and any truncation or
# resize is still caught by the shape and file-size checks.
FULL_HASH_MAX_BYTES = 2 << 30
SAMPLE_WINDOWS = 64
IDENT_KEYS = ("format", "model", "hook", "corpus", "part", "ctx_len", "n_windows", "seed")
# Stored element types (budget.cache_dtype). numpy has no bfloat16: its bits are kept as
# uint16 and widened exactly on read. A float32 entry's identity has no dtype key, so
# its fingerprint is the one entries had before the option existed.
CACHE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def stored_dtype(meta: dict[str, Any]) -> str:
    return str(meta.get("dtype", "float32"))


def to_float32(arr: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Stored activations as float32 (exact for every stored dtype)."""
    if stored_dtype(meta) == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32, copy=False)


def from_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """float32 activations in the stored dtype, rounded to nearest (even)."""
    if dtype == "bfloat16":
        t = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.bfloat16)
        return t.view(torch.int16).numpy().view(np.uint16)
    return arr.astype(CACHE_DTYPES[dtype], copy=False)


class CacheDamaged(ValueError):
    """An entry whose files do not match what its meta.json promises; rebuilt, never used."""


def _ident_digest(ident: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def _acts_sha256(acts: np.ndarray) -> str:
    h = hashlib.sha256()
    step = max(1, (64 << 20) // max(1, acts[0].nbytes))  # ~64 MB at a time
    for s in range(0, acts.shape[0], step):
        h.update(np.ascontiguousarray(acts[s : s + step]).data)
    return h.hexdigest()


def _acts_checksums(acts: np.ndarray) -> dict[str, Any]:
    if acts.nbytes <= FULL_HASH_MAX_BYTES:
        return {"acts": _acts_sha256(acts)}
    return {"acts_sample": _acts_sample_sha256(acts), "acts_sample_windows": SAMPLE_WINDOWS}


def _acts_sample_sha256(acts: np.ndarray) -> str:
    n = acts.shape[0]
    idx = np.unique(np.linspace(0, n - 1, num=min(n, SAMPLE_WINDOWS)).round().astype(np.int64))
    h = hashlib.sha256(idx.tobytes())
    for i in idx:
        h.update(np.ascontiguousarray(acts[i]).tobytes())
    return h.hexdigest()


def default_cache_root() -> Path:
    return Path(os.environ.get("DICTBENCH_CACHE", Path.home() / ".cache" / "dictbench"))


def fingerprint(
    model_fp: str,
    hook: str,
    corpus: CorpusSpec,
    part: str,
    n_windows: int,
    seed: int,
    dtype: str = "float32",
) -> tuple[str, dict[str, Any]]:
    ident: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "model": model_fp,
        "hook": hook,
        "corpus": corpus.identity(),
        "part": part,
        "ctx_len": corpus.ctx_len,
        "n_windows": n_windows,
        "seed": seed,
    }
    if dtype != "float32":
        ident["dtype"] = dtype
    return _ident_digest(ident), ident


@dataclass
class ActivationStore:
    """Read-only view of one cache entry; ``acts`` is memory-mapped, not loaded."""

    path: Path
    acts: np.ndarray  # [n_windows, ctx, d], float32 unless meta says another dtype
    tokens: np.ndarray  # [n_windows, ctx] int32
    mean: np.ndarray  # [d] float32, mean over non-special positions
    meta: dict[str, Any]
    reused: bool = False

    @property
    def keep(self) -> np.ndarray:
        return keep_positions(self.acts.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.acts.shape[0] * self.keep.sum())

    @classmethod
    def open(
        cls,
        path: Path,
        reused: bool = False,
        expect: tuple[str, dict[str, Any]] | None = None,
        checksums: bool = True,
    ) -> ActivationStore:
        """Open and verify an entry. ``CacheDamaged`` if its files are not what meta.json
        promises; ``UserError`` if ``expect`` (fingerprint, identity) names another entry.
        ``checksums=False`` skips re-hashing (for an entry this process just wrote)."""
        try:
            meta = json.loads((path / "meta.json").read_text())
            if not isinstance(meta, dict):
                raise ValueError("meta.json is not a JSON object")
            ident = {k: meta[k] for k in IDENT_KEYS}
            if "dtype" in meta:
                ident["dtype"] = meta["dtype"]
            fp = meta["fingerprint"]
            expected = (int(meta["n_windows"]), int(meta["ctx_len"]), int(meta["d_model"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheDamaged(f"meta.json unreadable ({type(e).__name__}: {e})") from e
        if _ident_digest(ident) != fp:
            raise CacheDamaged("meta.json does not match its own fingerprint")
        want = None if expect is None else json.loads(json.dumps(expect[1]))  # tuples -> lists
        if expect is not None and (fp != expect[0] or ident != want):
            changed = sorted(k for k in IDENT_KEYS if ident.get(k) != want.get(k))
            raise UserError(
                f"activation cache {path}: holds fingerprint {fp} (differs in "
                f"{', '.join(changed) or 'fingerprint'}), this run needs {expect[0]}; "
                "remove that folder or set cache_dir elsewhere"
            )
        try:
            acts = np.load(path / "acts.npy", mmap_mode="r")
            tokens = np.load(path / "tokens.npy", allow_pickle=False)
            mean = np.load(path / "mean.npy", allow_pickle=False)
        except Exception as e:  # numpy's header parser raises ValueError, SyntaxError, ...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CacheDamaged(f"cannot read its arrays ({type(e).__name__}: {first})") from e
        checks = [
            ("acts.npy", acts.shape == expected and acts.dtype == _np_dtype(meta)),
            ("acts.npy size", os.path.getsize(path / "acts.npy") == acts.offset + acts.nbytes),
            ("tokens.npy", tokens.shape == expected[:2] and tokens.dtype == np.int32),
            ("mean.npy", mean.shape == expected[2:] and mean.dtype == np.float32),
        ]
        sums = meta.get("checksums")  # absent in entries written before checksums existed
        if checksums and isinstance(sums, dict):
            sha = atomic.file_sha256
            checks += [
                ("tokens.npy checksum", sha(path / "tokens.npy") == sums.get("tokens")),
                ("mean.npy checksum", sha(path / "mean.npy") == sums.get("mean")),
            ]
            if "acts" in sums:
                checks.append(("acts.npy checksum", _acts_sha256(acts) == sums["acts"]))
            else:
                sample = _acts_sample_sha256(acts) == sums.get("acts_sample")
                checks.append(("acts.npy sampled checksum", sample))
        bad = [name for name, ok in checks if not ok]
        if bad:
            raise CacheDamaged(f"{', '.join(bad)} do not match meta.json")
        return cls(path, acts, tokens, mean, meta, reused)


def _np_dtype(meta: dict[str, Any]) -> Any:
    return np.dtype(CACHE_DTYPES.get(stored_dtype(meta), np.float32))


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


def _discard(entry: Path) -> None:
    """Move a damaged entry out of the way, then delete it (another process may race us)."""
    aside = entry.parent / f".damaged-{entry.name}-{os.getpid()}"
    try:
        os.replace(entry, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


@dataclass
class PendingHarvest:
    """A harvest whose token windows are chosen (so corpus errors surface) but not yet run."""

    final: Path
    fingerprint: str
    ident: dict[str, Any]
    tokens: np.ndarray
    part: str


def prepare(
    subject: Any,
    hook: str,
    corpus: CorpusSpec,
    part: str,
    n_tokens: int,
    seed: int,
    root: Path,
    log: Any = print,
    dtype: str = "float32",
) -> ActivationStore | PendingHarvest:
    """The cached store if one exists, else the windows to harvest.

    Split out from :func:`harvest` so a run can fail on a too-short corpus before it
    writes anything.
    """
    keep = keep_positions(corpus.ctx_len)
    n_windows = -(-n_tokens // int(keep.sum()))
    fp, ident = fingerprint(subject.fingerprint(), hook, corpus, part, n_windows, seed, dtype)
    final = root / f"{part}-{fp}"
    store = _reuse(final, part, fp, ident, log)
    if store is not None:
        return store
    tokens = make_windows(subject.tokenizer, corpus, part, n_windows, seed)
    return PendingHarvest(final, fp, ident, tokens, part)


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
        _discard(final)
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
                _discard(final)
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


def harvest(
    subject: Any,
    hook: str,
    corpus: CorpusSpec,
    part: str,
    n_tokens: int,
    seed: int,
    root: Path,
    batch_windows: int = 16,
    log: Any = print,
) -> ActivationStore:
    pending = prepare(subject, hook, corpus, part, n_tokens, seed, root, log)
    return run_harvest(subject, hook, pending, batch_windows, log)
