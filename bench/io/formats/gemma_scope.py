"""Gemma Scope's raw ``params.npz`` (JumpReLU), as in google/gemma-scope-* on the hub.

The arrays are W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]
and threshold [d_sae]; the forward is f = ReLU(p) * 1[p > threshold] with
p = x W_enc + b_enc (no b_dec subtraction) and x_hat = f W_dec + b_dec: SAELens's
jumprelu with ``apply_b_dec_to_input`` False. Read with ``allow_pickle=False``, so
an object array in the file is refused rather than unpickled.

There is no config: the hook comes from the path. Gemma Scope keeps residual-stream
SAEs in repositories named ``...-res`` under ``layer_L/...``; they read the output of
decoder layer L (TransformerLens's ``blocks.L.hook_resid_post``).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from dictbench.errors import UserError
from dictbench.io.formats.base import Converted, check_tensor, no_extra
from dictbench.io.saelens import SAELensSAE

WEIGHTS = "params.npz"
NAMES = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def matches(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file()


def hook_from_path(folder: Path) -> tuple[str | None, str | None]:
    """(our hook, the path's description of it): resid_post.L for ``layer_L`` in a
    ``...-res`` repository; an MLP or attention repository names a hook we cannot
    splice (so it is refused); neither: unknown, the spec's hook is used."""
    parts = folder.resolve().parts
    layers = [int(m.group(1)) for p in parts if (m := re.fullmatch(r"layer_(\d+)", p))]
    if not layers:
        return None, None
    for p in parts:
        if re.search(r"gemma-scope.*-res(\b|-|$)", p):
            return f"resid_post.{layers[-1]}", f"resid_post.{layers[-1]}"
        m = re.search(r"gemma-scope.*-(mlp|att|transcoders)(\b|-|$)", p)
        if m:
            return None, f"{m.group(1)} at layer {layers[-1]} (from the path)"
    return None, None


def read_arrays(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: np.asarray(data[name]) for name in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path}: not a readable .npz of plain arrays ({first})") from e
    out = {}
    for name, a in arrays.items():
        if a.dtype.kind != "f":
            raise UserError(f"{path}: array {name} has dtype {a.dtype}, expected floating point")
        out[name] = torch.from_numpy(a.astype(np.float32, copy=False))
    return out


def load(folder: Path) -> Converted:
    weights = folder / WEIGHTS
    arrays = read_arrays(weights)
    no_extra(arrays, set(NAMES), weights, "a Gemma Scope JumpReLU SAE")
    if "W_enc" not in arrays or arrays["W_enc"].dim() != 2:
        raise UserError(f"{weights}: missing a 2-d W_enc array")
    d_in, d_sae = (int(s) for s in arrays["W_enc"].shape)
    module = SAELensSAE("jumprelu", d_in, d_sae, apply_b_dec_to_input=False)
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,)}
    shapes.update({"b_dec": (d_in,), "threshold": (d_sae,)})
    for name, shape in shapes.items():
        getattr(module, name).copy_(check_tensor(arrays, name, shape, weights))
    hook, hook_name = hook_from_path(folder)
    return Converted(
        module=module.eval(),
        fmt="gemma_scope",
        method="gemma_scope-jumprelu",
        hook=hook,
        hook_name=hook_name,
        model=None,
        d_in=d_in,
    )
