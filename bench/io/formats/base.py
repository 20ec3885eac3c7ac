"""What every converter returns, and the checks every file from elsewhere goes through.

Each supported library's SAE is converted into :class:`dictbench.io.saelens.SAELensSAE`
(standard, topk, jumprelu or gated), whose forward pass is written once and tested
against SAELens; a converter's job is only to map tensor names, transpose where the
library stores ``nn.Linear`` weights, and say which of those four forwards the
library computes. Before a tensor is used its shape is checked against the config
and the other tensors, its dtype must be floating point, and every value finite.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dictbench.errors import UserError

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Converted:
    """A foreign SAE as a dictbench-evaluable module plus what its files say about it."""

    module: torch.nn.Module
    fmt: str  # "sparsify", "dictionary_learning", "gemma_scope", "saelens"
    method: str  # the ``baseline`` its records carry, e.g. "sparsify-topk"
    hook: str | None  # our spelling (resid_post.L); None when unknown
    hook_name: str | None  # as the source spells it
    model: str | None
    d_in: int


def check_tensor(
    tensors: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], where: Path
) -> torch.Tensor:
    """The named tensor as float32, after checking it exists, is float, has ``shape``
    and holds no NaN or infinity: one UserError line naming the file otherwise."""
    if name not in tensors:
        raise UserError(f"{where}: missing tensor {name}")
    t = tensors[name]
    if not isinstance(t, torch.Tensor):
        raise UserError(f"{where}: {name} is not a tensor")
    if t.dtype not in _FLOATS:
        raise UserError(f"{where}: tensor {name} has dtype {t.dtype}, expected floating point")
    if tuple(t.shape) != tuple(shape):
        raise UserError(f"{where}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        raise UserError(f"{where}: tensor {name} holds NaN or infinite values")
    return t


def positive_int(value: Any, key: str, where: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    return value


def no_extra(tensors: dict[str, Any], allowed: set[str], where: Path, what: str) -> None:
    """Refuse tensors we would silently ignore: they mean a variant we do not compute."""
    extra = sorted(set(tensors) - allowed)
    if extra:
        raise UserError(f"{where}: unexpected tensor(s) {', '.join(extra)} for {what}")


_LAYER_HOOKS = (
    # sparsify hookpoint names: the output of decoder layer L is the residual stream after it
    re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)$"),
    # dictionary_learning submodule names
    re.compile(r"^resid_post_layer_(\d+)$"),
)


def layer_output_hook(name: str | None) -> str | None:
    """A hookpoint naming a decoder layer's output in our spelling (resid_post.L)."""
    for pattern in _LAYER_HOOKS:
        m = pattern.match(name or "")
        if m:
            return f"resid_post.{m.group(1)}"
    return None
