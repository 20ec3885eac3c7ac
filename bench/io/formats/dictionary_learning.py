"""saprmarks/dictionary_learning: ``ae.pt`` (a torch state dict) + ``config.json``.

``ae.pt`` is a torch pickle. It is read only with ``torch.load(weights_only=True)``,
which builds tensors and plain containers and refuses any other object the file names,
so a hostile file cannot run code; it is never unpickled any other way.

``config.json``'s ``trainer.dict_class`` says which forward the state dict belongs to
(``nn.Linear`` weights are [out, in], hence the transposes):

- AutoEncoder:          f = ReLU(encoder(x - bias)),            x_hat = decoder(f) + bias
- AutoEncoderTopK:      f = TopK(ReLU(encoder(x - b_dec))),     x_hat = decoder(f) + b_dec
- BatchTopKSAE:         f = g * 1[g > threshold], g = ReLU(encoder(x - b_dec)) (inference)
- JumpReluAutoEncoder:  f = ReLU(p * 1[p > threshold]), p = x W_enc + b_enc
                        (no b_dec subtraction: the class fixes apply_b_dec_to_input False)

which are SAELens's standard, topk, jumprelu (one threshold for every latent) and
jumprelu forwards. BatchTopK's threshold starts at -1 before training; with any
threshold t, 1[g > t] g equals SAELens's ReLU(p) 1[p > ReLU(t)].
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

from dictbench.errors import UserError
from dictbench.io.formats.base import Converted, check_tensor, layer_output_hook, no_extra
from dictbench.io.saelens import SAELensSAE

WEIGHTS = "ae.pt"
CONFIG = "config.json"
# dict_class -> (SAELens architecture, tensors in ae.pt)
CLASSES = {
    "AutoEncoder": ("standard", {"encoder.weight", "encoder.bias", "decoder.weight", "bias"}),
    "AutoEncoderTopK": (
        "topk",
        {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
    ),
    "BatchTopKSAE": (
        "jumprelu",
        {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"},
    ),
    "JumpReluAutoEncoder": ("jumprelu", {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}),
}


def matches(folder: Path) -> bool:
    return (folder / WEIGHTS).is_file() and (folder / CONFIG).is_file()


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``ae.pt``; weights_only=True refuses anything but tensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{path}: not a plain torch state dict ({first})") from e
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise UserError(f"{path}: expected a state dict (a mapping of names to tensors)")
    return state


def _trainer(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON") from e
    trainer = cfg.get("trainer") if isinstance(cfg, dict) else None
    if not isinstance(trainer, dict):
        raise UserError(f"{path}: no 'trainer' object (dictionary_learning writes one)")
    return trainer


def load(folder: Path) -> Converted:
    where, weights = folder / CONFIG, folder / WEIGHTS
    trainer = _trainer(folder)
    cls = trainer.get("dict_class")
    if cls not in CLASSES:
        raise UserError(
            f"{where}: dict_class {cls!r} is not supported (supported: {', '.join(CLASSES)})"
        )
    arch, names = CLASSES[cls]
    state = read_state(weights)
    no_extra(state, names, weights, f"a dictionary_learning {cls}")
    d_in, d_sae = trainer.get("activation_dim"), trainer.get("dict_size")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (d_in, d_sae)):
        raise UserError(f"{where}: activation_dim and dict_size must be positive integers")
    module = _convert(cls, arch, state, d_in, d_sae, weights)
    submodule = trainer.get("submodule_name")
    return Converted(
        module=module.eval(),
        fmt="dictionary_learning",
        method=f"dictionary_learning-{cls}",
        hook=layer_output_hook(submodule),
        hook_name=submodule if isinstance(submodule, str) else None,
        model=trainer.get("lm_name") if isinstance(trainer.get("lm_name"), str) else None,
        d_in=d_in,
    )


def _convert(
    cls: str, arch: str, state: dict[str, Any], d_in: int, d_sae: int, where: Path
) -> SAELensSAE:
    if cls == "JumpReluAutoEncoder":
        out = SAELensSAE(arch, d_in, d_sae, apply_b_dec_to_input=False)
        out.W_enc.copy_(check_tensor(state, "W_enc", (d_in, d_sae), where))
        out.b_enc.copy_(check_tensor(state, "b_enc", (d_sae,), where))
        out.W_dec.copy_(check_tensor(state, "W_dec", (d_sae, d_in), where))
        out.b_dec.copy_(check_tensor(state, "b_dec", (d_in,), where))
        out.threshold.copy_(check_tensor(state, "threshold", (d_sae,), where))
        return out
    k = None
    if arch == "topk":
        k_t = state.get("k")
        if not isinstance(k_t, torch.Tensor) or k_t.numel() != 1 or k_t.is_floating_point():
            raise UserError(f"{where}: k must be one integer")
        k = int(k_t.item())
        if not 1 <= k <= d_sae:
            raise UserError(f"{where}: k={k} is not between 1 and dict_size {d_sae}")
    out = SAELensSAE(arch, d_in, d_sae, apply_b_dec_to_input=True, k=k)
    bias = "bias" if cls == "AutoEncoder" else "b_dec"
    out.W_enc.copy_(check_tensor(state, "encoder.weight", (d_sae, d_in), where).T)
    out.b_enc.copy_(check_tensor(state, "encoder.bias", (d_sae,), where))
    out.W_dec.copy_(check_tensor(state, "decoder.weight", (d_in, d_sae), where).T)
    out.b_dec.copy_(check_tensor(state, bias, (d_in,), where))
    if cls == "BatchTopKSAE":
        out.threshold.copy_(check_tensor(state, "threshold", (), where).expand(d_sae))
    return out
