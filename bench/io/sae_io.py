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

from dictbench import __version__, registry
from dictbench.errors import UserError
from dictbench.io import atomic

WEIGHTS = "sae_weights.safetensors"
CONFIG = "cfg.json"
# What people pass around as "the SAE" that is a pickle underneath (torch.save, HF .bin,
# Lightning .ckpt): torch.load on one runs whatever code it names, so they are refused
# by name and never opened.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")


def _pickle_refusal(path: Path) -> UserError:
    return UserError(
        f"{path}: a pickle-based checkpoint; dictbench reads SAEs only from safetensors "
        f"(a folder with {WEIGHTS} and {CONFIG}) because unpickling can run code"
    )


def sae_folder(path: str | Path) -> Path:
    """The folder of an SAE given the folder or one of its two files; pickles refused."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise _pickle_refusal(path)
        if path.name in (WEIGHTS, CONFIG):
            return path.parent
        raise UserError(f"{path}: not an SAE; pass the folder holding {WEIGHTS} and {CONFIG}")
    if not path.is_dir():
        raise UserError(f"{path}: no such file or folder")
    for p in (path / WEIGHTS, path / CONFIG):
        if not p.is_file():
            pickles = sorted(q for q in path.iterdir() if q.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                raise _pickle_refusal(pickles[0])
            raise UserError(f"{p}: missing (an SAE folder holds {WEIGHTS} and {CONFIG})")
    return path


def read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg})") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text, so not valid JSON") from e
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    return cfg


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors only. A pickle saved under a safetensors name is named as such."""
    try:
        return load_file(str(path))
    except Exception as e:
        with open(path, "rb") as fh:
            head = fh.read(4)
        # torch.save writes a zip ("PK\3\4"); a bare pickle starts with its protocol opcode.
        if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
            raise _pickle_refusal(path) from e
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path}: not a readable safetensors file ({first})") from e


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


def load_sae(
    folder: str | Path, trust_code: bool = False
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The SAE saved in ``folder``. A cfg.json naming a class as ``module:Class`` (a
    method outside dictbench) would make us import that module, which runs its code:
    such folders load only with ``trust_code`` (our own run folders, or a user's
    ``--trust-code``); registered and entry-point baselines load always."""
    folder = sae_folder(folder)
    weights, cfg_path = folder / WEIGHTS, folder / CONFIG
    cfg = read_config(cfg_path)
    if not isinstance(cfg.get("baseline"), str) or not cfg["baseline"]:
        raise UserError(f"{cfg_path}: no 'baseline' field, so not an SAE saved by dictbench")
    if ":" in cfg["baseline"] and not trust_code:
        raise UserError(
            f"{cfg_path}: its baseline '{cfg['baseline'][:200]}' is a class outside dictbench, "
            "and loading it imports and runs that module; pass --trust-code if you trust "
            "this folder"
        )
    if not isinstance(cfg.get("config", {}), dict):
        raise UserError(f"{cfg_path}: 'config' must be a JSON object")
    cls = registry.get_baseline(cfg["baseline"])
    known = set(getattr(cls.config_class, "__dataclass_fields__", {}))
    kwargs = {k: v for k, v in cfg.get("config", {}).items() if k in known}
    state = load_tensors(weights)
    # Check the sizes against the weights before building the SAE: a damaged or hostile
    # cfg.json must not make us allocate a dictionary of any size it names.
    if "W_dec" not in state:
        raise UserError(f"{weights}: missing tensor(s) W_dec")
    sizes = (kwargs.get("d_sae"), kwargs.get("d_in"))
    if sizes != tuple(state["W_dec"].shape):
        raise UserError(
            f"{cfg_path}: config d_sae={sizes[0]!r}, d_in={sizes[1]!r} does not match "
            f"W_dec of shape {tuple(state['W_dec'].shape)} in {WEIGHTS}"
        )
    try:
        sae = cls(cls.config_class(**kwargs))
    except Exception as e:  # any config value the class cannot take
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{cfg_path}: its config does not build {cfg['baseline']} ({first})") from e
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
