"""EleutherAI sparsify (``eai-sparsify``): ``cfg.json`` + ``sae.safetensors``, one folder
per hookpoint, the folder named after the hookpoint (e.g. ``layers.6``).

sparsify 1.x computes f = TopK(ReLU((x - b_dec) W^T + b)) with W = ``encoder.weight``
[num_latents, d_in], and x_hat = f W_dec + b_dec with ``W_dec`` [num_latents, d_in]:
SAELens's topk forward with W_enc = W^T (ReLU before or after the top-k selects the
same values). Transcoders, skip connections and the ``groupmax`` activation compute
something else and are refused by name.
"""

from __future__ import annotations

from pathlib import Path

from dictbench.errors import UserError
from dictbench.io.formats.base import (
    Converted,
    check_tensor,
    layer_output_hook,
    no_extra,
    positive_int,
)
from dictbench.io.sae_io import load_tensors, read_config
from dictbench.io.saelens import SAELensSAE

CONFIG = "cfg.json"
WEIGHTS = "sae.safetensors"
TENSORS = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}


def matches(folder: Path) -> bool:
    return (folder / CONFIG).is_file() and (folder / WEIGHTS).is_file()


def load(folder: Path) -> Converted:
    cfg_path, weights = folder / CONFIG, folder / WEIGHTS
    cfg = read_config(cfg_path)
    for key, bad in (("transcode", "a transcoder"), ("skip_connection", "a skip connection")):
        if cfg.get(key):
            raise UserError(f"{cfg_path}: {bad} ({key}: true) is not supported")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise UserError(f"{cfg_path}: activation '{activation}' is not supported (only topk)")
    d_in = positive_int(cfg.get("d_in"), "d_in", cfg_path)
    k = positive_int(cfg.get("k"), "k", cfg_path)
    state = load_tensors(weights)
    no_extra(state, TENSORS, weights, "a sparsify TopK SAE")
    enc = state.get("encoder.weight")
    n = int(enc.shape[0]) if enc is not None and enc.dim() == 2 else 0
    num_latents = cfg.get("num_latents") or d_in * int(cfg.get("expansion_factor") or 0)
    if num_latents != n:
        raise UserError(
            f"{cfg_path}: num_latents/expansion_factor give {num_latents} latents but "
            f"encoder.weight in {WEIGHTS} has {n}"
        )
    if k > n:
        raise UserError(f"{cfg_path}: k={k} is more than the {n} latents")
    module = SAELensSAE("topk", d_in, n, apply_b_dec_to_input=True, k=k)
    module.W_enc.copy_(check_tensor(state, "encoder.weight", (n, d_in), weights).T)
    module.b_enc.copy_(check_tensor(state, "encoder.bias", (n,), weights))
    module.W_dec.copy_(check_tensor(state, "W_dec", (n, d_in), weights))
    module.b_dec.copy_(check_tensor(state, "b_dec", (d_in,), weights))
    return Converted(
        module=module.eval(),
        fmt="sparsify",
        method="sparsify-topk",
        hook=layer_output_hook(folder.name),
        hook_name=folder.name,
        model=None,
        d_in=d_in,
    )
