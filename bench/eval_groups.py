"""`dictbench eval`'s scoring of one group of SAEs: those that resolve to one spec.

A group shares the subject model (loaded once per call, across groups), one set of
evaluation activations, one mean-ablation store and one task environment, so the
SAE-independent downstream passes are shared: the ablated ones run once per group
(``env.shared``) and, through ``dictbench.score.eval_shared``, once per cache fingerprint
across calls; the clean one runs once per batch for as many of the group's SAEs as fit
in memory together (``dictbench.group_scoring``). ``prepare`` does every check before
anything is written; ``score`` then writes the records.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dictbench import registry
from dictbench.console import log
from dictbench.data.cache import (
    EntryRequest,
    default_cache_root,
    lookup,
    prepare,
    run_harvest,
)
from dictbench.data.subject import SubjectModel
from dictbench.errors import UserError
from dictbench.group_scoring import Member, chunks, parameter_bytes, score_members, shares_passes
from dictbench.io import atomic
from dictbench.resources import available_gpu_bytes, available_ram_bytes
from dictbench.score import eval_shared
from dictbench.score.scoring import build_env, record_context
from dictbench.spec import RunSpec


@dataclass
class Group:
    """SAEs scored under one spec (``LoadedSAE`` objects from dictbench.evaluate)."""

    spec: RunSpec
    source: str
    saes: list[Any]


# eval.json's name for a mean over part of the training split (not the run's mean).
PARTIAL_MEAN = "training split, part"


def _train_mean(
    subject: SubjectModel, spec: RunSpec, root: Path, mean_tokens: int | None
) -> tuple[Any, dict[str, Any]]:
    """The store whose mean is the mean-ablation baseline, and what eval.json says of it."""

    def train_request(n: int) -> EntryRequest:
        return EntryRequest(spec.corpus, "train", n, spec.seed)

    def pending(n: int) -> Any:
        return prepare(subject, spec.hook, train_request(n), root, log)

    if mean_tokens is None:
        request = train_request(spec.budget.train_tokens)
        full = lookup(subject, spec.hook, request, root, log)  # reads no corpus
        if full is not None:
            return full, {"source": "training cache of the spec", "tokens": full.n_tokens}
        n = min(spec.budget.train_tokens, spec.eval.tokens)
        if n == spec.budget.train_tokens:
            return pending(n), {"source": "training split of the spec", "tokens": n}
    else:
        if mean_tokens <= 0:
            raise UserError(f"--mean-tokens: must be positive, got {mean_tokens}")
        n = mean_tokens
    return pending(n), {"source": PARTIAL_MEAN, "tokens": n}


def _subject(spec: RunSpec, subjects: dict[str, SubjectModel]) -> SubjectModel:
    key = json.dumps(dataclasses.asdict(spec.model), sort_keys=True, default=str)
    if key not in subjects:
        log(f"loading subject model {spec.model.name} ...")
        subjects[key] = SubjectModel.load(spec.model)
    return subjects[key]


@dataclass
class Prepared:
    subject: SubjectModel
    pending_eval: Any
    pending_mean: Any
    mean_info: dict[str, Any]
    sae_bytes: list[int]  # each SAE's weights: how many can be held together


def prepare_group(group: Group, subjects: dict, mean_tokens: int | None) -> Prepared:
    """Model, hook, widths and the caches' token windows: every check before any write."""
    spec = group.spec
    log(f"spec: {spec.name} ({group.source}); hook {spec.hook}; tasks {', '.join(spec.tasks)}")
    for sae in group.saes:
        log(f"scoring {sae.fmt} SAE {sae.sae_id} ({sae.method}) from {sae.path}")
        if sae.model and sae.model != spec.model.name:
            log(f"note: the SAE names model {sae.model!r}; scoring on {spec.model.name!r}")
    subject = _subject(spec, subjects)
    subject.stream_position(spec.hook)
    for sae in group.saes:
        if sae.d_in != subject.d_model:
            raise UserError(
                f"{sae.path}: the SAE reads {sae.d_in}-dimensional activations but "
                f"{spec.model.name} has d_model {subject.d_model}; pass --spec or --preset "
                "naming the model it was trained on"
            )
    root = Path(spec.cache_dir) if spec.cache_dir else default_cache_root()
    request = EntryRequest(spec.corpus, "eval", spec.eval.tokens, spec.seed)
    pending_eval = prepare(subject, spec.hook, request, root, log)
    pending_mean, mean_info = _train_mean(subject, spec, root, mean_tokens)
    sizes = [parameter_bytes(sae.module) for sae in group.saes]
    return Prepared(subject, pending_eval, pending_mean, mean_info, sizes)


def together_budget(device: str) -> int:
    """Bytes of SAE weights held at once to share passes: a quarter of the free memory
    of the device they run on (the passes' own tensors need room too); 2 GiB where the
    free memory is unknown. One SAE larger than this is still scored, on its own."""
    free = available_gpu_bytes(device) if device.startswith("cuda") else available_ram_bytes()
    return free // 4 if free else 2 << 30


def _entry(sae: Any, group_index: int) -> dict[str, Any]:
    return {
        "path": str(sae.path),
        "format": sae.fmt,
        "sae_id": sae.sae_id,
        "baseline": sae.method,
        "hook": sae.hook_name,
        "model": sae.model,
        "spec_group": group_index,
    }


def score(group: Group, prep: Prepared, out_dir: Path, info: dict, reload: Any) -> None:
    """Harvest (or reuse) the group's caches and write every SAE's records. ``reload``
    reads an SAE again when its weights were let go after the checks."""
    spec, subject, mean_info = group.spec, prep.subject, prep.mean_info
    info["device"] = subject.device
    entries = [_entry(sae, len(info["groups"])) for sae in group.saes]
    info["saes"].extend(entries)
    record = {"spec_source": group.source, "spec": spec.to_dict(), "train_mean": mean_info}
    info["groups"].append(record)
    atomic.write_json(out_dir / "eval.json", info)

    eval_store = run_harvest(subject, spec.hook, prep.pending_eval, log=log)
    mean_store = run_harvest(subject, spec.hook, prep.pending_mean, log=log)
    record["caches"] = {"eval": str(eval_store.path), "train_mean": str(mean_store.path)}
    env = build_env(spec, subject, mean_store.mean, eval_store)
    reused = eval_shared.load(env, eval_store, mean_store)
    if reused:
        log(f"reusing {reused} SAE-independent result(s) stored beside the eval activations")
    context = record_context(spec, subject, eval_store)
    task_context = {}
    if mean_info["source"] == PARTIAL_MEAN:
        # Not the mean a run of this spec ablates with: its records must not be compared
        # with a run's as if they were (the leaderboard and `check` refuse the mix).
        n_mean = mean_info["tokens"]
        task_context["downstream"] = {"mean_ablation": f"first {n_mean} training tokens"}
    records = GroupRecords(out_dir, context, task_context)
    _score_chunks(group, prep, env, records, entries, reload)
    eval_shared.save(env, eval_store, mean_store)


@dataclass(frozen=True)
class GroupRecords:
    """Where a group's records go and what every one of them carries besides its SAE's id
    and method: the eval folder, the group's record context, and additions for single
    tasks (the note on a partial mean-ablation). Fixed for the group: every chunk writes
    with the same three."""

    out_dir: Path
    context: dict[str, Any]
    task_context: dict[str, dict[str, Any]]


def _score_chunks(
    group: Group,
    prep: Prepared,
    env: Any,
    records: GroupRecords,
    entries: list[dict[str, Any]],
    reload: Any,
) -> None:
    """Score the group's SAEs a chunk at a time: a chunk is as many as fit the memory
    budget together, and shares its clean passes; the records are those of each alone."""
    tasks = [registry.get_task(name)() for name in group.spec.tasks]
    device = prep.subject.device
    # Without a task that shares passes there is nothing to gain from holding several.
    budget = together_budget(device) if any(map(shares_passes, tasks)) else 0
    for idx in chunks(prep.sae_bytes, budget):
        members = [_member(group.saes[i], reload, device, records.context) for i in idx]
        seconds = score_members(members, tasks, env, records.out_dir, records.task_context)
        for i, s in zip(idx, seconds, strict=True):
            entries[i]["seconds"] = s
        del members  # only this chunk's SAEs are in memory at a time


def _member(sae: Any, reload: Any, device: str, context: dict[str, Any]) -> Member:
    module = sae.module if sae.module is not None else reload(sae.path).module
    return Member(module.to(device).eval(), sae.sae_id, sae.method, context)
