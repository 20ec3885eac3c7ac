"""What a run will train: the spec's baseline entries expanded into SAEs, and the
state the run's steps share (``RunContext``).

Planning is separate from running so that every SAE's id, seed and shard are fixed
(and checked for clashes) before a model is loaded or a file is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dictbench import registry
from dictbench.errors import UserError
from dictbench.spec import BaselineEntry, RunSpec


@dataclass
class PlannedSAE:
    sae_id: str
    method: str
    cls: type
    params: dict[str, Any]
    # The SAE's own seed (init and token order); the data split stays from spec.seed.
    seed: int = 0


@dataclass
class RunContext:
    """One run's shared state, handed whole from step to step of ``runner.run``."""

    spec: RunSpec
    planned: list[PlannedSAE]
    out: Path
    resuming: bool  # --resume was asked for
    shard: dict[str, int] | None  # {"index": i, "count": n} for --shard i/n
    t_start: float  # perf_counter at the start, for timings["total_s"]
    timings: dict[str, Any] = field(default_factory=dict)
    # The interrupted run's run.json when continuing one (known once the lock is held).
    previous: dict[str, Any] | None = None


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


def sequence_windows(spec: RunSpec) -> int:
    """Whole windows per step of the sequence-batch (e2e) methods, as trainer.train has it."""
    from dictbench.data.corpus import keep_positions

    kept = int(keep_positions(spec.corpus.ctx_len).sum())
    return max(1, spec.budget.batch_size // kept)
