"""Loading run folders for the leaderboard and check: records, run.json, and the shard
folders of one sweep (`dictbench run --shard`) merged back into one run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dictbench.errors import UserError
from dictbench.score.training_metrics import TRAINING_TASK


def training_error(rec: dict[str, Any]) -> str | None:
    """The error of a failed training record (empty metrics, details.error), else None."""
    if rec.get("task") != TRAINING_TASK or rec.get("metrics"):
        return None
    err = (rec.get("details") or {}).get("error")
    return str(err) if err else "training failed"


@dataclass
class Run:
    """One run folder's records; ``label`` tells runs apart in tables and plots."""

    path: Path
    label: str
    records: list[dict[str, Any]]
    info: dict[str, Any] | None  # run.json, when the folder has one


def load_run(path: Path, label: str | None = None) -> Run:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"'{path}': no such run folder")
    records = []
    for p in sorted((path / "results").glob("*/*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"'{p}': not a readable result record ({e})") from e
        missing = [k for k in ("sae_id", "baseline", "task", "metrics") if k not in rec]
        if missing:
            raise UserError(f"'{p}': not a result record (missing {', '.join(missing)})")
        rec["_path"] = str(p)
        records.append(rec)
    if not records:
        raise UserError(f"'{path}' holds no result records (results/<sae_id>/<task>.json)")
    info = None
    run_json = path / "run.json"
    if run_json.is_file():
        try:
            info = json.loads(run_json.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"'{run_json}': not readable JSON ({e})") from e
    return Run(path, label or path.resolve().name, records, info)


def _shard_of(run: Run) -> tuple[str, int, int] | None:
    """(sweep key, index, count) of a folder written by `dictbench run --shard I/N`.

    Shards of one sweep have identical specs apart from the output folder."""
    info = run.info or {}
    shard = info.get("shard")
    if not isinstance(shard, dict):
        return None
    spec = {k: v for k, v in (info.get("spec") or {}).items() if k != "out"}
    count = shard.get("count")
    return json.dumps([spec, count], sort_keys=True), int(shard.get("index", -1)), int(count)


def merge_shards(runs: list[Run]) -> list[Run]:
    """One Run per sharded sweep: its shard folders' records together, labelled by the
    spec's name, placed where its first shard was given. Other runs are kept as they are."""
    merged: list[Run] = []
    by_key: dict[str, Run] = {}
    seen: dict[tuple[str, int], Path] = {}
    for run in runs:
        shard = _shard_of(run)
        if shard is None:
            merged.append(run)
            continue
        key, index, count = shard
        if (key, index) in seen:
            raise UserError(
                f"shard {index}/{count} of one sweep given twice: {seen[(key, index)]} "
                f"and {run.path}"
            )
        seen[(key, index)] = run.path
        if key not in by_key:
            name = str(((run.info or {}).get("spec") or {}).get("name") or run.label)
            info = {**(run.info or {}), "shards": []}
            by_key[key] = Run(run.path, name, [], info)
            merged.append(by_key[key])
        whole = by_key[key]
        ids = {r["sae_id"] for r in whole.records}
        clash = sorted({r["sae_id"] for r in run.records} & ids)
        if clash:
            raise UserError(f"SAE '{clash[0]}' appears in two shards of one sweep ({run.path})")
        whole.records.extend(run.records)
        whole.info["shards"].append({"index": index, "count": count, "path": str(run.path)})
    return merged


def load_runs(paths: list[Path]) -> list[Run]:
    """Load run folders, labelled by folder name (by path where two names clash); the
    shard folders of one sweep (`dictbench run --shard`) become one run."""
    runs = merge_shards([load_run(Path(p)) for p in paths])
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1:
            r.label = str(r.path)
    seen = [str(r.path.resolve()) for r in runs]
    dupes = sorted({s for s in seen if seen.count(s) > 1})
    if dupes:
        raise UserError(f"run folder given twice: {dupes[0]}")
    return runs
