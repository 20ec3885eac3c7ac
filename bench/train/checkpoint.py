"""Trainer checkpoints: everything needed to continue an SAE's training bit for bit.

A checkpoint is one safetensors file per SAE. Tensors: the SAE's state dict (its
parameters and registered buffers, e.g. TopK's dead-latent counters), the optimiser
state, the RNG states (torch CPU and CUDA, numpy, python) and the dead-latent window
mask. A JSON header inside the same file holds the step to continue from, the
optimiser's hyperparameters, the running training terms, an identity of what the
training depends on, and a SHA-256 over all of it. One file means one atomic
rename, so a reader sees the previous checkpoint or the complete new one.

Nothing here unpickles: safetensors holds tensors only and the header is JSON, so a
damaged or planted checkpoint can be refused but never execute code.

State a baseline changes during training must live in parameters or buffers; plain
attributes are rebuilt on resume by constructing the SAE from the same seed and
calling its ``on_train_start`` on the same sample, which is what the first run did.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from dictbench.io import atomic

FORMAT = 1
META_KEY = "dictbench_checkpoint"


class CheckpointError(Exception):
    """A checkpoint that cannot be used (damaged, truncated, or for other training)."""


@dataclass
class CheckpointPlan:
    """What the trainer needs to checkpoint one SAE: where, how often, and for what.

    ``identity`` names everything the training result depends on (method, config,
    budget, seed, training cache); a checkpoint written under another identity is
    never resumed from.
    """

    path: Path
    every: int
    identity: dict[str, Any]
    resume: bool = False
    log: Callable[[str], None] = print


@dataclass
class TrainState:
    """Where the loop stands: ``step`` is the next step to run (``total_steps`` when done;
    a checkpoint whose step lies outside ``[0, total_steps]`` is refused)."""

    step: int
    fired: torch.Tensor
    terms: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    has_latents: bool = False
    total_steps: int = 0


def canonical(obj: Any) -> Any:
    """``obj`` as it reads back from JSON, so identities compare equal after a round trip."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's raw bytes as a buffer (no copy for a contiguous CPU tensor)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, np.uint8)


def digest(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes) and the header without it."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    body = {k: v for k, v in meta.items() if k != "sha256"}
    h.update(json.dumps(body, sort_keys=True).encode())
    return h.hexdigest()


# --- RNG states ------------------------------------------------------------------------


def _capture_rng(device: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng/torch": torch.get_rng_state().clone()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s.clone()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, py_gauss = random.getstate()
    meta = {
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(internal), py_gauss],
    }
    return tensors, meta


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted(
        (int(k.rsplit("/", 1)[1]), v) for k, v in tensors.items() if k.startswith("rng/cuda/")
    )
    if cuda and torch.cuda.is_available():
        # Only the GPUs this machine has: a run resumed with fewer visible GPUs must not
        # fail here, after the SAE and optimiser were already restored.
        n_gpus = torch.cuda.device_count()
        for i, v in cuda:
            if i < n_gpus:
                torch.cuda.set_rng_state(v, i)
    kind, pos, has_gauss, gauss = meta["numpy"]
    keys = tensors["rng/numpy"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, int(pos), int(has_gauss), float(gauss)))
    version, internal, py_gauss = meta["python"]
    random.setstate((version, tuple(internal), py_gauss))


# --- optimiser state -------------------------------------------------------------------


def _optim_parts(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim/{idx}/{key}"] = val.detach().cpu().contiguous().clone()
            else:
                scalars[f"{idx}/{key}"] = val
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, {"optim_scalars": scalars, "param_groups": groups}


def _optim_state_dict(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> dict[str, Any]:
    """The optimiser state dict to load, checked against ``opt`` without changing it."""
    fresh = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("optim/"):
            _, idx, key = name.split("/", 2)
            state.setdefault(int(idx), {})[key] = t
    for name, val in meta["optim_scalars"].items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = val
    for idx, st in state.items():
        if not 0 <= idx < len(params):
            raise CheckpointError(f"optimiser state for parameter {idx}, which does not exist")
        for key, val in st.items():
            if torch.is_tensor(val) and val.dim() > 0:
                if val.shape != params[idx].shape:
                    raise CheckpointError(
                        f"optimiser state {key} of parameter {idx} has shape "
                        f"{tuple(val.shape)}, expected {tuple(params[idx].shape)}"
                    )
                # Saved contiguous; restored in the parameter's layout (a transposed W_enc
                # is), as Adam creates its moments: its fused kernel needs the two to agree.
                st[key] = torch.empty_like(params[idx], dtype=val.dtype).copy_(val)
    saved = meta["param_groups"]
    if len(saved) != len(fresh["param_groups"]):
        raise CheckpointError("optimiser has a different number of parameter groups")
    groups = []
    for new, old in zip(fresh["param_groups"], saved, strict=True):
        if list(old.get("params", [])) != list(new["params"]):
            raise CheckpointError("optimiser parameter groups hold different parameters")
        g = dict(new)
        for k, v in old.items():
            if k != "params":
                g[k] = tuple(v) if isinstance(new.get(k), tuple) else v
        groups.append(g)
    return {"state": state, "param_groups": groups}


# --- save / load -------------------------------------------------------------------------


def save(
    path: Path,
    identity: dict[str, Any],
    sae: torch.nn.Module,
    opt: torch.optim.Optimizer,
    state: TrainState,
    device: str = "cpu",
) -> None:
    """Write the checkpoint atomically (the previous one stays valid until the rename)."""
    tensors = {
        f"model/{k}": v.detach().cpu().contiguous().clone() for k, v in sae.state_dict().items()
    }
    opt_tensors, opt_meta = _optim_parts(opt)
    rng_tensors, rng_meta = _capture_rng(device)
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    tensors["train/fired"] = state.fired.detach().cpu().contiguous().clone()
    meta: dict[str, Any] = {
        "format": FORMAT,
        "identity": canonical(identity),
        "step": int(state.step),
        "total_steps": int(state.total_steps),
        "terms": {k: float(v) for k, v in state.terms.items()},
        "wall_seconds": float(state.wall_seconds),
        "has_latents": bool(state.has_latents),
        "rng": rng_meta,
        **opt_meta,
    }
    meta["sha256"] = digest(tensors, meta)
    data = st_save(tensors, metadata={META_KEY: json.dumps(meta)})
    atomic.write_bytes(path, data)


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checkpoint's tensors and header, verified against its checksum."""
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # SafetensorError, OSError, ... whatever a damaged file raises
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"not a readable safetensors file ({first})") from e
    if META_KEY not in header:
        raise CheckpointError("not a dictbench checkpoint (no header)")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"header is not valid JSON ({e.msg})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError("unknown checkpoint format")
    if meta.get("sha256") != digest(tensors, meta):
        raise CheckpointError("checksum mismatch (the file was altered or damaged)")
    return tensors, meta


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else k)
    return f"{where or 'identity'}: {a!r} in the checkpoint, {b!r} now"


def load(
    path: Path,
    identity: dict[str, Any],
    sae: torch.nn.Module,
    opt: torch.optim.Optimizer,
    device: str = "cpu",
) -> TrainState:
    """Restore SAE, optimiser and RNG states from ``path``; ``CheckpointError`` if unusable.

    ``sae`` and ``opt`` must be built exactly as for a fresh start (same seed, after
    ``on_train_start``); only then does the restored state continue the same run.
    """
    tensors, meta = read(path)
    if meta.get("identity") != canonical(identity):
        diff = _first_difference(meta.get("identity"), canonical(identity))
        raise CheckpointError(f"written for different training ({diff})")
    # Check everything before changing anything: a refused checkpoint must leave the
    # fresh SAE and optimiser exactly as they were, so training can start from step 0.
    try:
        model_sd = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
        expected = sae.state_dict()
        if set(model_sd) != set(expected):
            odd = sorted(set(model_sd) ^ set(expected))
            raise CheckpointError(f"SAE state has different tensors ({', '.join(odd)})")
        for k, v in expected.items():
            if model_sd[k].shape != v.shape or model_sd[k].dtype != v.dtype:
                raise CheckpointError(
                    f"SAE tensor {k} is {model_sd[k].dtype} {tuple(model_sd[k].shape)}, "
                    f"expected {v.dtype} {tuple(v.shape)}"
                )
        opt_sd = _optim_state_dict(opt, tensors, meta)
        state = TrainState(
            step=int(meta["step"]),
            fired=tensors["train/fired"].to(device),
            terms={str(k): float(v) for k, v in meta["terms"].items()},
            wall_seconds=float(meta["wall_seconds"]),
            has_latents=bool(meta["has_latents"]),
        )
        rng_meta = meta["rng"]
        if "rng/torch" not in tensors or "rng/numpy" not in tensors:
            raise CheckpointError("RNG state missing")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"incomplete checkpoint ({type(e).__name__}: {e})") from e
    total_steps = int(meta.get("total_steps", -1))
    if not 0 <= state.step <= total_steps:
        raise CheckpointError(f"step {state.step} is outside the run")
    state.total_steps = total_steps
    sae.load_state_dict(model_sd, strict=True)
    opt.load_state_dict(opt_sd)
    _restore_rng(tensors, rng_meta)
    return state


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
