"""Validation of a built run spec: every rule a spec must meet before a run starts.

Why one place, checked early: an impossible budget, an unknown method or task, or a
task option the task refuses must be a one-line ``SpecError`` naming the field before
anything is written, not a failure an hour into training. The checks run in a fixed
order (budget, data, methods, tasks, run settings), so a spec with several faults
always reports the same first one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dictbench.errors import SpecError, UserError

if TYPE_CHECKING:
    from dictbench.spec_types import RunSpec

SOURCES = ("auto", "cache", "stream")
CACHE_DTYPES = ("float32", "float16", "bfloat16")
MODEL_DTYPES = ("float32", "float16", "bfloat16", "float64")


def validate(spec: RunSpec) -> None:
    """Raise a ``SpecError`` naming the first field that breaks a rule."""
    from dictbench import registry

    _check_budget(spec)
    _check_data(spec)
    if not spec.baselines:
        raise SpecError("baselines: at least one baseline is needed")
    if not spec.tasks:
        raise SpecError("tasks: at least one task is needed")
    _check_baselines(spec, registry)
    _check_tasks(spec, registry)
    _check_run_settings(spec)


def _check_budget(spec: RunSpec) -> None:
    b, e = spec.budget, spec.eval
    positive = {
        "budget.d_sae": b.d_sae,
        "budget.batch_size": b.batch_size,
        "budget.train_tokens": b.train_tokens,
        "eval.tokens": e.tokens,
        "eval.downstream_tokens": e.downstream_tokens,
        "eval.batch_tokens": e.batch_tokens,
    }
    for name, value in positive.items():
        if value <= 0:
            raise SpecError(f"{name}: must be positive, got {value}")
    if b.lr <= 0:
        raise SpecError(f"budget.lr: must be positive, got {b.lr}")
    if b.train_tokens < b.batch_size:
        raise SpecError(
            f"budget.train_tokens: {b.train_tokens} tokens is less than one batch "
            f"(budget.batch_size {b.batch_size})"
        )
    for name, frac in (("lr_warmup_frac", b.lr_warmup_frac), ("lr_decay_frac", b.lr_decay_frac)):
        if not 0 <= frac <= 1:
            raise SpecError(f"budget.{name}: must be in [0, 1], got {frac}")
    if b.lr_warmup_frac + b.lr_decay_frac > 1:
        raise SpecError("budget.lr_warmup_frac + budget.lr_decay_frac: must not exceed 1")
    _check_budget_options(spec)


def _check_budget_options(spec: RunSpec) -> None:
    """The budget's named choices (autocast, source, buffer, cache dtype)."""
    b = spec.budget
    if b.autocast not in (None, "bfloat16"):
        raise SpecError(
            f"budget.autocast: must be bfloat16 or null, got {b.autocast!r} (float16 would "
            "need loss scaling, which dictbench does not do)"
        )
    if b.source not in SOURCES:
        raise SpecError(f"budget.source: must be one of {', '.join(SOURCES)}, got {b.source!r}")
    if b.buffer_tokens <= 0:
        raise SpecError(f"budget.buffer_tokens: must be positive, got {b.buffer_tokens}")
    if b.cache_dtype not in CACHE_DTYPES:
        raise SpecError(
            f"budget.cache_dtype: must be one of {', '.join(CACHE_DTYPES)}, got {b.cache_dtype!r}"
        )


def _check_data(spec: RunSpec) -> None:
    c = spec.corpus
    if not 0 < c.eval_fraction < 1:
        raise SpecError(f"corpus.eval_fraction: must be in (0, 1), got {c.eval_fraction}")
    if c.ctx_len < 3:
        raise SpecError(f"corpus.ctx_len: must be at least 3, got {c.ctx_len}")
    if spec.model.dtype not in MODEL_DTYPES:
        raise SpecError(f"model.dtype: unknown dtype '{spec.model.dtype}'")


def _check_baselines(spec: RunSpec, registry: Any) -> None:
    """Each entry names a known method whose hyperparameters it sets or sweeps."""
    for i, entry in enumerate(spec.baselines):
        where = f"baselines[{i}]"
        if not entry.method:
            raise SpecError(f"{where}.method: missing")
        try:
            cls = registry.get_baseline(entry.method)
        except UserError as err:
            raise SpecError(f"{where}.method: {err}") from err
        lacking = registry.missing_for_budget(cls, spec.budget.normalize_activations)
        if lacking:
            raise SpecError(f"{where}.method: baseline '{entry.method}' {lacking}")
        known = set(getattr(cls.config_class, "__dataclass_fields__", {}))
        keys = [("params", k) for k in entry.params] + [("sweep", k) for k in entry.sweep]
        for section, key in keys:
            if key not in known or key in ("d_in", "d_sae"):
                raise SpecError(
                    f"{where}.{section}.{key}: not a hyperparameter of {entry.method} "
                    f"(known: {', '.join(sorted(known - {'d_in', 'd_sae'}))})"
                )
        for key, values in entry.sweep.items():
            if not values:
                raise SpecError(f"{where}.sweep.{key}: empty list")


def _check_tasks(spec: RunSpec, registry: Any) -> None:
    """Known tasks; options only for this run's tasks, checked by the task itself;
    a task that needs a known dictionary only in a synthetic run."""
    for i, task in enumerate(spec.tasks):
        try:
            registry.get_task(task)
        except UserError as err:
            raise SpecError(f"tasks[{i}]: {err}") from err
    for task, opts in spec.task_options.items():
        if task not in spec.tasks:
            raise SpecError(f"task_options.{task}: not one of this run's tasks")
        check = getattr(registry.get_task(task), "validate_options", None)
        if check is not None:  # a task that checks its own options fails the spec early
            check(opts)
    if spec.synthetic is not None:
        spec.synthetic.validate()
        return
    for i, task in enumerate(spec.tasks):
        if getattr(registry.get_task(task), "needs_ground_truth", False):
            raise SpecError(
                f"tasks[{i}]: {task} needs a known dictionary; add a synthetic: section"
            )


def _check_run_settings(spec: RunSpec) -> None:
    if spec.seeds is not None and (
        not spec.seeds or len(set(spec.seeds)) != len(spec.seeds) or min(spec.seeds) < 0
    ):
        raise SpecError(f"seeds: expected distinct non-negative integers, got {spec.seeds}")
    if spec.checkpoint_every_steps < 0:
        raise SpecError(
            f"checkpoint_every_steps: must be 0 (only at the end) or positive, "
            f"got {spec.checkpoint_every_steps}"
        )
    if "." not in spec.hook:
        raise SpecError(f"hook: '{spec.hook}' is not a hook point; use resid_post.L or resid_pre.L")
