"""Where a metric's facts (direction, tolerance, headline) come from when reading records.

First the record itself (``metric_meta``, written from the task's ``metrics`` declaration,
so a third-party task's numbers are read right even where its code is not importable),
then the task registry (records written before records carried metadata, such as the
committed reference runs), else nothing: the caller's fallback for an unknown metric.

The registry import is lazy: it imports the tasks and so torch, which the leaderboard
must not pay for unless some record lacks metadata.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from dictbench.errors import UserError
from dictbench.score.metric_meta import Metric
from dictbench.score.training_metrics import (
    IGNORED_PREFIXES,
    TRAINING_METRICS,
    TRAINING_REPORT_ORDER,
    TRAINING_TASK,
)

DEFAULT_REPORT_ORDER = 100


@dataclass(frozen=True)
class MetricFact:
    """A metric's declaration and its place among headline columns: (the task's report
    order, the metric's index in the task's declaration)."""

    metric: Metric
    order: tuple[int, int]


def _ignored(name: str) -> Metric:
    return Metric(name, "equal", gate=False, doc="final training-loss term: not gated")


def declared(task: str, metric_names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The ``metric_meta`` a record of ``task`` stores for the metrics it writes: each
    declared metric's JSON plus its ``order``. Undeclared metrics are left out (the
    readers' fallback then applies)."""
    names = list(metric_names)
    facts = _task_facts(task)
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        fact = facts.get(name)
        if fact is None and task == TRAINING_TASK and name.startswith(IGNORED_PREFIXES):
            fact = MetricFact(_ignored(name), (TRAINING_REPORT_ORDER, len(facts)))
        if fact is not None:
            out[name] = {**fact.metric.to_json(), "order": list(fact.order)}
    return out


def _facts_of(metrics: Iterable[Metric], order: int) -> dict[str, MetricFact]:
    return {m.name: MetricFact(m, (order, i)) for i, m in enumerate(metrics)}


def _task_facts(task: str) -> dict[str, MetricFact]:
    if task == TRAINING_TASK:
        return _facts_of(TRAINING_METRICS, TRAINING_REPORT_ORDER)
    from dictbench import registry

    cls = registry.task_class(task)
    if cls is None:
        return {}
    return _facts_of(getattr(cls, "metrics", ()), getattr(cls, "report_order", 100))


@functools.cache
def registered() -> dict[str, MetricFact]:
    """Every registered task's declared metrics, and the training record's."""
    from dictbench import registry

    out: dict[str, MetricFact] = {}
    for task in registry.task_names():
        out.update(_task_facts(task))
    out.update(_task_facts(TRAINING_TASK))
    return out


def _from_record(rec: dict[str, Any]) -> dict[str, MetricFact]:
    raw = rec.get("metric_meta")
    if raw is None:
        return {}
    where = rec.get("_path", f"record {rec.get('sae_id')}/{rec.get('task')}")
    if not isinstance(raw, dict):
        raise UserError(f"'{where}': metric_meta must map metric names to declarations")
    out = {}
    for name, entry in raw.items():
        try:
            metric = Metric.from_json({**entry, "name": name})
            order = entry.get("order", [DEFAULT_REPORT_ORDER, 0])
            out[name] = MetricFact(metric, (int(order[0]), int(order[1])))
        except (TypeError, ValueError, AttributeError, IndexError) as e:
            raise UserError(f"'{where}': metric_meta for '{name}' is not readable ({e})") from e
    return out


def facts_for(records: Iterable[dict[str, Any]]) -> dict[str, MetricFact]:
    """name -> fact for every metric the records hold that has one: the first record's
    own declaration wins, then the registry. A metric with neither is absent."""
    out: dict[str, MetricFact] = {}
    missing: list[str] = []
    for rec in records:
        own = _from_record(rec)
        for name in rec.get("metrics") or {}:
            if name in out:
                continue
            if name in own:
                out[name] = own[name]
            elif name.startswith(IGNORED_PREFIXES) and rec.get("task") == TRAINING_TASK:
                out[name] = MetricFact(_ignored(name), (TRAINING_REPORT_ORDER, 99))
            else:
                missing.append(name)
    unresolved = [n for n in missing if n not in out]
    if unresolved:
        known = registered()
        out.update({n: known[n] for n in unresolved if n in known})
    return out


def headline(facts: dict[str, MetricFact]) -> list[str]:
    """Headline metric names, in report order."""
    return [n for n, f in sorted(facts.items(), key=lambda kv: kv[1].order) if f.metric.headline]
