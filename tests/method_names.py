"""The registered methods, for tests that loop over methods: a new baseline is covered by
every such suite automatically (or fails it loudly), never skipped by a hand-written list.

What a method needs in a short test run is read from the class (its config's fields),
not from a list here."""

from __future__ import annotations

from typing import Any

from dictbench import registry


def all_methods() -> list[str]:
    return list(registry.registered_baselines())


def local_methods() -> list[str]:
    """Methods that train on activations alone (no subject model past the hook)."""
    return [n for n, c in registry.registered_baselines().items() if not c.needs_downstream]


def downstream_methods() -> list[str]:
    """Methods whose loss runs the model past the hook (e2e-style)."""
    return [n for n, c in registry.registered_baselines().items() if c.needs_downstream]


def short_run_params(method: str, k: int, dead_tokens_threshold: int | None = None) -> dict:
    """Settings a short run needs, for the config fields the method has: a small ``k``
    and, for AuxK-style methods, a dead-latent window that short runs reach."""
    fields = registry.get_baseline(method).config_class.__dataclass_fields__
    out: dict[str, Any] = {}
    if "k" in fields:
        out["k"] = k
    if dead_tokens_threshold is not None and "dead_tokens_threshold" in fields:
        out["dead_tokens_threshold"] = dead_tokens_threshold
    return out
