"""Saving and loading SAEs as safetensors + cfg.json (the SAELens on-disk shape).

Only safetensors is ever read: it holds tensors and nothing else, so loading an
SAE someone sent cannot execute code the way unpickling a .pt file can.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from dictbench import __version__, atomic, registry
from dictbench.errors import UserError

WEIGHTS = "sae_weights.safetensors"
CONFIG = "cfg.json"


def class_ref(cls: type) -> str:
    name = getattr(cls, "name", "")
    try:
        if name and registry.get_baseline(name) is cls:
            return name
    except UserError:
        pass
    return f"{cls.__module__}:{cls.__qualname__}"


def save_sae(sae: torch.nn.Module, folder: Path, extra: dict[str, Any]) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    cfg_obj = sae.cfg
    cfg = {
        "baseline": class_ref(type(sae)),
        "config": dataclasses.asdict(cfg_obj) if dataclasses.is_dataclass(cfg_obj) else {},
        "d_in": int(sae.W_dec.shape[1]),
        "d_sae": int(sae.W_dec.shape[0]),
        "dictbench_version": __version__,
        **extra,
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(folder / WEIGHTS, save(tensors))
    atomic.write_json(folder / CONFIG, cfg)


def load_sae(folder: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    folder = Path(folder)
    weights, cfg_path = folder / WEIGHTS, folder / CONFIG
    for p in (weights, cfg_path):
        if not p.is_file():
            raise UserError(f"{p}: missing (an SAE folder holds {WEIGHTS} and {CONFIG})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path}: not valid JSON ({e.msg})") from e
    cls = registry.get_baseline(cfg["baseline"])
    known = set(getattr(cls.config_class, "__dataclass_fields__", {}))
    sae = cls(cls.config_class(**{k: v for k, v in cfg.get("config", {}).items() if k in known}))
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise UserError(f"{weights}: not a readable safetensors file ({e})") from e
    expected = sae.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{weights}: missing tensor(s) {', '.join(missing)}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise UserError(
                f"{weights}: tensor {k} has shape {tuple(state[k].shape)}, "
                f"expected {tuple(v.shape)}"
            )
    sae.load_state_dict(state, strict=False)
    return sae.eval(), cfg
