"""`dictbench run --resume`: what an interrupted run folder already holds, and whether to trust it.

Everything here reads; nothing writes. A file that is missing, unreadable, or written
for another spec or evaluation context counts as not done, so the runner regenerates
it (training is deterministic, so a regenerated result equals the lost one). Only two
things are refused outright: resuming with a spec that differs from the recorded one,
and a run.json that cannot be read (the spec it records is what makes resuming safe).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dictbench.errors import UserError
from dictbench.io import atomic
from dictbench.train.checkpoint import canonical

# Spec fields that may change between the interrupted run and its resumption: they
# decide where files go and how often state is saved, never what is computed.
MAY_DIFFER = ("out", "cache_dir", "checkpoint_every_steps")
# A task option that holds a secret: run.json records a marker in its place.
SECRET_OPTION = "api_key"


def read_run_json(out: Path) -> dict[str, Any] | None:
    """The recorded run, None if the run never got as far as writing it."""
    path = out / "run.json"
    if not path.exists():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--resume: {path} is damaged ({e}); cannot tell which spec it ran") from e
    if not isinstance(info, dict) or not isinstance(info.get("spec"), dict):
        raise UserError(f"--resume: {path} holds no spec; cannot tell which spec it ran")
    return info


def _first_difference(a: Any, b: Any, where: str) -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            diff = _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
            if diff:
                return diff
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            diff = _first_difference(x, y, f"{where}[{i}]")
            if diff:
                return diff
        return None
    return None if a == b else f"{where}: {a!r} in the run, {b!r} now"


def _comparable(spec_data: dict[str, Any]) -> dict[str, Any]:
    data = {k: v for k, v in canonical(spec_data).items() if k not in MAY_DIFFER}
    for opts in (data.get("task_options") or {}).values():
        if isinstance(opts, dict):
            opts.pop(SECRET_OPTION, None)  # never recorded (redacted), never affects results
    return data


def check_same_spec(out: Path, recorded: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume under a different spec: the results would mix two experiments."""
    a, b = _comparable(recorded), _comparable(current)
    diff = _first_difference(a, b, "")
    if diff:
        raise UserError(
            f"--resume: the spec differs from the run in {out} ({diff}); "
            "resume with the same spec, or start a new run in another --out"
        )


def recorded_spec_data(out: Path) -> dict[str, Any]:
    """The spec recorded in ``out/run.json``, for `dictbench run --resume --out DIR`."""
    info = read_run_json(out)
    if info is None:
        raise UserError(
            f"--resume: {out / 'run.json'} not found; nothing to resume there "
            "(give the spec to start the run)"
        )
    data = dict(info["spec"])
    for opts in (data.get("task_options") or {}).values():
        if isinstance(opts, dict):
            opts.pop(SECRET_OPTION, None)  # the recorded marker is not a key; use the env
    return data


def remove_partial_writes(out: Path) -> list[Path]:
    """Temporary files of atomic writes a killed run left (``.<name>.<random>.tmp``)."""
    gone = []
    for p in out.rglob(".*.tmp"):
        if p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def read_record(path: Path, sae_id: str, task: str, context: dict[str, Any]) -> dict | None:
    """A result record if it is complete and belongs to this SAE, task and context."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("metrics"), dict):
        return None
    if rec.get("sae_id") != sae_id or rec.get("task") != task:
        return None
    if canonical(rec.get("context")) != canonical(context):
        return None
    return rec


def _is_json_object(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


@dataclass
class SaeProgress:
    """How far one SAE got: trained (weights verified), failed, and tasks still to score."""

    trained: bool = False
    failed: str | None = None
    missing_tasks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def sae_progress(
    out: Path, sae_id: str, context: dict[str, Any], tasks: list[str], weights_name: str
) -> SaeProgress:
    prog = SaeProgress(missing_tasks=list(tasks))
    results = out / "results" / sae_id
    training_path = results / "training.json"
    if not training_path.exists():
        return prog
    rec = read_record(training_path, sae_id, "training", context)
    if rec is None:
        prog.notes.append(f"{training_path} is damaged or from another run; retraining")
        return prog
    details = rec.get("details") or {}
    if details.get("error"):
        prog.failed = str(details["error"])
        prog.missing_tasks = []
        return prog
    weights = out / "saes" / sae_id / weights_name
    want = details.get("weights_sha256")
    if not weights.is_file() or (want is not None and atomic.file_sha256(weights) != want):
        prog.notes.append(f"{weights} is missing or damaged; retraining")
        return prog
    config = weights.with_name("cfg.json")
    if not _is_json_object(config):
        prog.notes.append(f"{config} is missing or damaged; retraining")
        return prog
    prog.trained = True
    prog.missing_tasks = []
    for t in tasks:
        path = results / f"{t}.json"
        if read_record(path, sae_id, t, context) is None:
            prog.missing_tasks.append(t)
            if path.exists():
                prog.notes.append(f"{path} is damaged or from another run; scoring again")
    return prog
