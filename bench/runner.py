"""`dictbench run`: model -> corpus -> activation cache -> train each SAE -> score -> records.

The steps, each in its own module: planning the SAEs (``dictbench.run_plan``), what
run.json records (``dictbench.run_info``), scoring an SAE (``dictbench.score.scoring``),
continuing an interrupted run (``dictbench.run_resume``) and training in lockstep
groups (``dictbench.train.run_training``). Here: the order they run in, under the run
folder's lock.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from dictbench import faults, registry
from dictbench.console import check_writable, log
from dictbench.data.cache import (
    ActivationStore,
    EntryRequest,
    default_cache_root,
    prepare,
    run_harvest,
)
from dictbench.data.subject import SubjectModel
from dictbench.data.synthetic import make_stores, one_thread
from dictbench.errors import UserError
from dictbench.io import atomic
from dictbench.io.lock import RunLock
from dictbench.report.leaderboard import table
from dictbench.resources import cache_bytes, require_disk
from dictbench.run_info import describe_run
from dictbench.run_plan import (  # noqa: F401 - re-exported: importers use these names
    PlannedSAE,
    RunContext,
    plan_saes,
    sequence_windows,
    shard_saes,
)
from dictbench.run_resume import previous_run, resume_sae
from dictbench.score.records import RecordTarget
from dictbench.score.scoring import (  # noqa: F401 - re-exported: importers use these names
    Scoring,
    build_env,
    record_context,
    sae_context,
    score_sae,
)
from dictbench.spec import RunSpec
from dictbench.train import distributed
from dictbench.train.run_training import (
    RunFolder,
    TrainingData,
    choose_source,
    group_key,
    record_failure,
    save_trained,
    train_planned,
)
from dictbench.train.trainer import TrainingFailed


class _NoLock:
    """What ranks other than 0 hold: they never write into the run folder."""

    took_over = None

    def __enter__(self) -> _NoLock:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _run_lock(out: Path) -> RunLock | _NoLock:
    return RunLock(out) if distributed.is_main() else _NoLock()


def _needs_subject(p: PlannedSAE) -> bool:
    """Whether the method trains through the subject model past the hook (e2e)."""
    return bool(getattr(p.cls, "needs_downstream", False))


def run(spec: RunSpec, resume: bool = False, shard: tuple[int, int] | None = None) -> Path:
    """Run ``spec`` end to end. With ``resume``, continue the interrupted run in its out
    folder: finished SAEs and task records are kept, training continues from its last
    checkpoint, and the results equal those of an uninterrupted run. With ``shard`` (i, n),
    run only shard i of n of the sweep (see ``shard_saes``). Under torchrun every process
    calls this; bench/train/distributed.py says who does what."""
    t_start = time.perf_counter()
    planned = plan_saes(spec)
    if shard is not None:
        planned = shard_saes(planned, shard)
    distributed.refuse_unsupported(planned, spec.budget.batch_size, sequence_windows(spec))
    if spec.synthetic is not None and all(_needs_subject(p) for p in planned):
        raise UserError("baselines: every baseline needs a subject model; a synthetic run has none")
    default_out = Path("runs") / (
        spec.name if shard is None else f"{spec.name}-shard{shard[0]}of{shard[1]}"
    )
    out = Path(spec.out or default_out)
    shard_info = None if shard is None else {"index": shard[0], "count": shard[1]}
    if distributed.is_main():  # every check that needs no weights, before loading them
        from dictbench.preflight import check_before_model_load

        groups = Counter(group_key(p, spec) for p in planned)  # SAEs in memory at once
        check_before_model_load(spec, out, max(groups.values()))
    created = not out.exists()
    check_writable(out)
    ctx = RunContext(spec, planned, out, resume, shard_info, t_start)
    try:
        # The folder lock is taken before the model loads: a second run into the same
        # folder is refused at once, and two runs started together cannot both pass the
        # checks.
        with _run_lock(out) as lock:
            if lock.took_over:
                log(f"note: an earlier run in {out} ({lock.took_over}) ended without finishing")
            if spec.synthetic is not None:
                return _run_synthetic(ctx)
            return _load_and_run(ctx)
    except UserError:
        if created and distributed.is_main():  # refused before writing: leave no folder
            _remove_if_empty(out)
        raise


def _remove_if_empty(out: Path) -> None:
    try:
        out.rmdir()  # only ever an empty folder: anything written stays
    except OSError:
        pass


def _load_and_run(run: RunContext) -> Path:
    """Load the subject model, choose the token windows, then train and score (the lock
    on ``out`` is already held)."""
    spec, timings = run.spec, run.timings
    t = time.perf_counter()
    log(f"loading subject model {spec.model.name} ...")
    subject = SubjectModel.load(spec.model)
    subject.stream_position(spec.hook)  # validates the hook before anything is written
    timings["load_model_s"] = time.perf_counter() - t

    cache_root = Path(spec.cache_dir) if spec.cache_dir else default_cache_root()
    t = time.perf_counter()
    # Choosing the token windows first makes corpus errors (too short, bad field) fail
    # the run before it writes anything.
    train = EntryRequest(
        spec.corpus, "train", spec.budget.train_tokens, spec.seed, spec.budget.cache_dtype
    )
    pending_train = prepare(subject, spec.hook, train, cache_root, log)
    evaluation = EntryRequest(spec.corpus, "eval", spec.eval.tokens, spec.seed)
    pending_eval = prepare(subject, spec.hook, evaluation, cache_root, log)
    timings["tokenize_s"] = time.perf_counter() - t
    return _run_locked(run, subject, pending_train, pending_eval)


def _run_synthetic(run: RunContext) -> Path:
    """A run on generated activations with a known dictionary: no model, corpus or
    harvest. Methods that train through the model past the hook cannot run here."""
    spec, syn = run.spec, run.spec.synthetic
    assert syn is not None
    kept = []  # not empty: ``run`` refused a spec of such methods only
    for p in run.planned:
        if _needs_subject(p):
            log(f"skipping {p.sae_id}: it trains through a subject model; synthetic runs have none")
        else:
            kept.append(p)
    t = time.perf_counter()
    log(
        f"generating synthetic activations: {syn.n_features} features in {syn.d_in} dimensions, "
        f"{spec.budget.train_tokens} train and {spec.eval.tokens} eval tokens ..."
    )
    train_store, eval_store, _ = make_stores(  # the eval store carries the answer key
        syn, spec.seed, spec.budget.train_tokens, spec.eval.tokens
    )
    run.timings["generate_s"] = time.perf_counter() - t
    # One thread: these matrices are tiny, so a second thread only adds synchronisation
    # (and stalls badly on a busy machine), and a fixed count keeps results reproducible.
    with one_thread():
        return _run_locked(replace(run, planned=kept), None, train_store, eval_store)


def _run_locked(
    run: RunContext, subject: SubjectModel | None, pending_train: Any, pending_eval: Any
) -> Path:
    """Everything that writes into ``out``, done while this process holds its lock."""
    main = distributed.is_main()
    previous = previous_run(run.out, run.spec) if run.resuming and main else None
    if run.resuming:  # every rank must know whether SAEs resume (they load checkpoints together)
        previous = distributed.broadcast_object(previous)
    run.previous = previous
    run_info = describe_run(run, subject)
    if main:
        atomic.write_json(run.out / "run.json", run_info)

    data, eval_store = _training_data(run.spec, subject, pending_train, pending_eval, run.timings)
    run_info["caches"] = {
        "train": None
        if data.store is None
        else {"path": str(data.store.path), "reused": data.store.reused},
        "eval": {"path": str(eval_store.path), "reused": eval_store.reused},
    }
    run_info["training_source"] = "stream" if data.streamed else "cache"
    scoring = _scoring(run, subject, data, eval_store)
    failed = _train_and_score_all(run, data, scoring)
    run.timings["total_s"] = time.perf_counter() - run.t_start
    run_info.update(status="complete", failed=failed)
    if not main:
        return run.out
    atomic.write_json(run.out / "run.json", run_info)
    log("")
    log(table(run.out))
    log(f"\nresults in {run.out}; total wall time {run.timings['total_s']:.1f} s")
    return run.out


def _scoring(
    run: RunContext, subject: SubjectModel | None, data: TrainingData, eval_store: Any
) -> Scoring:
    """The tasks this run can score (none that need a model on a synthetic run), their
    environment and the context every record carries."""
    spec, timings = run.spec, run.timings
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
    if run.previous is not None:  # timings of SAEs finished before the interruption
        timings["saes"].update((run.previous.get("timings") or {}).get("saes") or {})
    return Scoring(tasks, env, run.out, context, timings, task_context)


def _open_harvested(pending: Any) -> ActivationStore:
    """The entry rank 0 has just harvested or verified (sizes checked; not re-hashed)."""
    if isinstance(pending, ActivationStore):
        return pending
    return ActivationStore.open(
        pending.final, reused=True, expect=(pending.fingerprint, pending.ident), checksums=False
    )


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


def _train_and_score_all(run: RunContext, data: TrainingData, sc: Scoring) -> list[str]:
    """Finish what an interrupted run left, train the rest in lockstep groups, then save
    and score each SAE in the spec's order. Returns the ids of SAEs that failed."""
    main, spec = distributed.is_main(), run.spec
    resumed = run.previous is not None  # asked for, and there was a run to continue
    failed: list[str] = []
    todo = []
    for p in run.planned:
        done = None
        if resumed:
            own = replace(sc, context=sae_context(p, spec, sc.context))
            done = resume_sae(p, own) if main else None
            done = distributed.broadcast_object(done)  # rank 0 read the folder for everyone
        if done is None:
            todo.append(p)
        elif not done:
            failed.append(p.sae_id)
    distributed.barrier()
    devices = list(spec.devices or [sc.env.device])
    results = train_planned(todo, spec, data, devices, RunFolder(sc.out, log, resumed))
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
        target = RecordTarget(sc.out, p.sae_id, p.method, ctx, sc.task_context)
        score_sae(sae, target, sc.tasks, sc.env)
        sc.timings["saes"][p.sae_id] = {
            "train_s": res.wall_seconds,
            "eval_s": time.perf_counter() - t,
        }
        faults.point(f"sae_done:{p.sae_id}")
    return [p.sae_id for p in run.planned if p.sae_id in set(failed)]
