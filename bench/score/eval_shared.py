"""SAE-independent results of `dictbench eval`, stored beside the evaluation activations.

The zero- and mean-ablated downstream losses do not depend on the SAE: within one
process every SAE at a spec shares them through ``env.shared`` (tasks/downstream.py),
and this file keeps them across processes, so a later eval at the same evaluation
cache fingerprint, mean-ablation store and device kind reads them instead of running
the two ablated passes again. The file sits next to the cache entry and is named after
it; a damaged file costs only the recomputation. Writes are atomic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dictbench.io import atomic

ABLATION = "downstream.ablation"  # tasks/downstream.py's env.shared key


def path_for(eval_store: Any) -> Path:
    """Beside the evaluation activations, so it lives and dies with that cache entry."""
    return eval_store.path.parent / f"{eval_store.path.name}.sae-independent.json"


def key_name(key: Any, mean_store: Any, device: str) -> str | None:
    """The file's name for an ``env.shared`` entry worth keeping; None for others. The
    mean-ablated loss depends on the mean's store, and float sums on the device kind."""
    if not (isinstance(key, tuple) and key and key[0] == ABLATION):
        return None
    kind = "cuda" if device.startswith("cuda") else device
    return "|".join([*map(str, key), f"mean={mean_store.path.name}", f"device={kind}"])


def load(env: Any, eval_store: Any, mean_store: Any) -> int:
    """Seed ``env.shared`` with the stored SAE-independent results; returns how many."""
    path = path_for(eval_store)
    try:
        stored = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return 0  # a damaged file only costs the recomputation
    if not isinstance(stored, dict):
        return 0
    n = 0
    for n_seq in range(1, int(eval_store.acts.shape[0]) + 1):
        key = (ABLATION, n_seq)
        value = stored.get(key_name(key, mean_store, env.device) or "")
        if isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value):
            env.shared[key] = (float(value[0]), float(value[1]))
            n += 1
    return n


def save(env: Any, eval_store: Any, mean_store: Any) -> None:
    path = path_for(eval_store)
    try:
        stored = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        stored = {}
    stored = stored if isinstance(stored, dict) else {}
    new = {}
    for key, value in env.shared.items():
        name = key_name(key, mean_store, env.device)
        if name is not None and name not in stored:
            new[name] = list(value)
    if new:
        atomic.write_json(path, {**stored, **new})


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
