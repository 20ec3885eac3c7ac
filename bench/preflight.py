"""Every check that does not need the model's weights, run before loading them.

Why: loading the subject model takes 40 s or more, so a typo found after it costs that
much each try, and a second run into a busy folder shares the CPU with the first all
that time before being refused. Everything here reads only small files: the hook name
against the model's config (a GGUF header or a transformers config, no weights), the
corpus files (present, and text), the output folder (writable, not locked by another
run), the judge's settings, and the memory and disk the SAEs will need.

Call ``check_before_model_load(spec, out)`` after the spec is validated and before
``SubjectModel.load``. Each failure is a one-line ``UserError``; nothing is written.
"""

from __future__ import annotations

import codecs
import math
import os
import tempfile
import types
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dictbench import resources
from dictbench.errors import UserError

# Corpus formats read as text by the `datasets` builders; parquet/arrow are binary.
TEXT_FORMATS = ("text", "json", "jsonl", "csv")
_CHUNK = 1 << 20


# --- hook point ------------------------------------------------------------------------


def model_shape(model: Any) -> tuple[int, int] | None:
    """(num_hidden_layers, hidden_size) from the model's config alone, or None where the
    config cannot be had without the hub (the model load then reports the problem)."""
    from dictbench.data import subject

    if model.name == subject.EMBEDDED_MODEL:
        from dictbench.data import gguf_header

        path = os.path.join(subject.embedded_model_folder(), subject._GGUF_FILE)
        return gguf_header.layer_count_and_width(path)
    try:
        import transformers

        if model.name.startswith("tiny:"):
            fields = {k: v for k, v in model.config.items() if k != "seed"}
            cfg = transformers.AutoConfig.for_model(model.name.split(":", 1)[1], **fields)
        else:
            kwargs = {"revision": model.revision} if model.revision else {}
            cfg = transformers.AutoConfig.from_pretrained(
                model.name, local_files_only=True, **kwargs
            )
        return int(cfg.num_hidden_layers), int(cfg.hidden_size)
    except Exception:  # unknown architecture, not cached, ...: the load says it properly
        return None


def check_hook(hook: str, n_layers: int | None) -> None:
    """The same rule (and message) as ``SubjectModel.stream_position``, on the config's
    layer count; with ``n_layers`` None only the form is checked."""
    from dictbench.data.subject import _HOOK_RE, SubjectModel

    if n_layers is None:
        if not _HOOK_RE.match(hook):
            SubjectModel.stream_position(types.SimpleNamespace(n_layers=1), hook)  # raises
        return
    SubjectModel.stream_position(types.SimpleNamespace(n_layers=n_layers), hook)


# --- corpus ----------------------------------------------------------------------------


def check_text_file(path: str | Path) -> None:
    """UTF-8 all through, no NUL byte; a failure names the file and the byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                nul = chunk.find(b"\x00")
                if nul >= 0:
                    raise UserError(
                        f"corpus file '{path}': not text (a NUL byte at byte offset "
                        f"{offset + nul}; a binary file?)"
                    )
                pending = len(decoder.getstate()[0])  # bytes of a character split by a chunk
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    raise UserError(
                        f"corpus file '{path}': not UTF-8 text (invalid byte at byte offset "
                        f"{offset - pending + e.start})"
                    ) from None
                offset += len(chunk)
            tail = len(decoder.getstate()[0])
            if tail:
                raise UserError(
                    f"corpus file '{path}': not UTF-8 text (truncated character at byte "
                    f"offset {offset - tail})"
                )
    except IsADirectoryError:
        raise UserError(f"corpus file '{path}': is a folder") from None
    except OSError as e:
        raise UserError(f"corpus file '{path}': cannot read ({e.strerror})") from None


def check_corpus(corpus: Any) -> list[str]:
    """The local files the corpus will read (globs expanded), each checked; [] for a hub
    dataset, which only the load can check."""
    from dictbench.data import corpus as corpus_mod

    if corpus.name == corpus_mod.EMBEDDED_CORPUS:
        files = corpus_mod.embedded_corpus_files()
    elif corpus.data_files:
        files = corpus_mod._expand(corpus.data_files)
    else:
        return []
    if corpus.data_files and corpus.format not in TEXT_FORMATS:
        return files  # a binary format: `datasets` checks it
    for path in files:
        check_text_file(path)
    return files


# --- output folder ---------------------------------------------------------------------


def check_out_writable(out: Path) -> None:
    """Probe with a temporary file in the folder (or its nearest existing parent), so that
    nothing is left behind when a later check fails."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: cannot write to '{out}' (it exists and is not a folder)")
    probe_dir = resources._existing_ancestor(out)
    if not probe_dir.is_dir():
        raise UserError(f"--out: cannot write to '{out}' ('{probe_dir}' is not a folder)")
    try:
        fd, name = tempfile.mkstemp(prefix=".dictbench-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"--out: cannot write to '{out}' ({e.strerror})") from None


def check_not_locked(out: Path) -> None:
    """Refuse now, not after the model load, when another run holds ``out``'s lock. Only
    probes (a held lock file always exists); the run takes the lock itself later."""
    from dictbench.io import lock

    if lock.fcntl is None:
        return
    path = out / lock.LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return  # no lock file: nobody holds it
    try:
        try:
            lock.fcntl.flock(fd, lock.fcntl.LOCK_EX | lock.fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(fd, 4096, 0).decode(errors="replace")
            raise lock.RunLock(out)._refuse(raw) from None
        lock.fcntl.flock(fd, lock.fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --- judge -----------------------------------------------------------------------------


def check_judge(spec: Any) -> None:
    """The autointerp judge's options and URL form, when the task is asked for."""
    if "autointerp" not in spec.tasks:
        return
    from dictbench.tasks.autointerp_config import WHERE, judge_settings, parse_options
    from dictbench.tasks.base import TaskSkipped

    opts = parse_options(spec.task_options.get("autointerp") or {})
    try:
        settings = judge_settings(opts)
    except TaskSkipped:
        return  # no judge configured: the task is skipped and says why
    if settings.base_url is not None:
        parts = urlsplit(settings.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(
                f"{WHERE}.base_url (or OPENAI_BASE_URL): expected an http(s) URL with a "
                f"host, got '{settings.base_url}'"
            )
        try:
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise UserError(f"{WHERE}.base_url: bad port in '{settings.base_url}'") from None


# --- resources -------------------------------------------------------------------------


def planned_d_saes(spec: Any) -> list[int]:
    """One d_sae per SAE the spec plans: every sweep point of every baseline trains at
    ``budget.d_sae`` (the common budget; spec validation refuses a per-entry d_sae)."""
    n = sum(math.prod(len(v) for v in entry.sweep.values()) for entry in spec.baselines)
    return [spec.budget.d_sae] * n


def check_sae_resources(spec: Any, d_in: int, out: Path, lockstep_saes: int = 1) -> None:
    """Memory to train the largest ``lockstep_saes`` SAEs at once, and the output disk."""
    sizes = sorted(planned_d_saes(spec), reverse=True)
    if not sizes:
        return
    device = getattr(spec.model, "device", "cpu") if spec.synthetic is None else "cpu"
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    together = sizes[: max(1, lockstep_saes)]  # the largest ones: the worst case
    needed = sum(resources.sae_training_bytes(d_in, d, spec.budget.batch_size) for d in together)
    label = f"{len(together)} SAE(s) of d_sae up to {together[0]} on d_in {d_in}"
    resources.require_memory(f"{label} (batch {spec.budget.batch_size})", needed, device)
    disk = sum(resources.checkpoint_bytes(d_in, d) for d in sizes)
    resources.require_disk("the SAE checkpoints and weights", out, disk)


# --- all together ----------------------------------------------------------------------


def check_before_model_load(spec: Any, out: Path, lockstep_saes: int = 1) -> None:
    """All weight-free checks, cheapest first; raises ``UserError`` at the first failure.
    ``lockstep_saes``: how many SAEs the trainer keeps in memory at once."""
    out = Path(out)
    check_out_writable(out)
    check_not_locked(out)
    check_judge(spec)
    if spec.synthetic is not None:
        check_sae_resources(spec, int(spec.synthetic.d_in), out, lockstep_saes)
        return
    shape = model_shape(spec.model)
    check_hook(spec.hook, shape[0] if shape else None)
    check_corpus(spec.corpus)
    if shape is not None:
        check_sae_resources(spec, shape[1], out, lockstep_saes)
