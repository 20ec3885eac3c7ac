"""Conversion between dictbench's saved SAEs and SAELens's on-disk layout.

Both layouts are a folder with ``sae_weights.safetensors`` and ``cfg.json``; they
differ in tensor names (dictbench keeps method-specific ones, e.g. JumpReLU's
``log_threshold``) and in what cfg.json says. This module

* exports a dictbench SAE as the SAELens architecture that computes the same
  function (``standard``, ``gated``, ``topk`` or ``jumprelu``), and refuses the
  ones that have none, and
* reads a SAELens folder into :class:`SAELensSAE`, an inference-only module whose
  ``encode``/``decode`` are SAELens's forward pass, so SAEs trained elsewhere can be
  scored by dictbench's tasks.

Which cfg.json is written. SAELens 6 nests model and hook under ``metadata`` and
keys ``k`` at the top level; SAELens 5 reads a flat dict with ``hook_layer``,
``activation_fn_str`` and ``activation_fn_kwargs``. SAELens 6 converts a cfg.json
that carries no ``sae_lens_version`` with its pre-6 path, and SAELens 5 ignores
keys it does not know. So we write the flat SAELens 5 layout, without a version,
plus the keys SAELens 6 reads directly (``k``, ``rescale_acts_by_decoder_norm``):
one file both versions load. Reading accepts either layout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from dictbench import atomic
from dictbench.baselines.init import unit_rows
from dictbench.errors import UserError
from dictbench.sae_io import (
    CONFIG,
    WEIGHTS,
    class_ref,
    load_sae,
    load_tensors,
    read_config,
    sae_folder,
)

ARCHITECTURES = ("standard", "gated", "topk", "jumprelu")
_TL_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_OUR_HOOK = re.compile(r"^resid_(pre|post)\.(\d+)$")


# --- hook names ---------------------------------------------------------------------------


def to_tl_hook(hook: str) -> tuple[str, int]:
    """Our hook name as TransformerLens's (SAELens's) name and layer index."""
    m = _OUR_HOOK.match(hook)
    if not m:
        raise UserError(f"hook '{hook}' has no SAELens name (expected resid_pre.L or resid_post.L)")
    return f"blocks.{m.group(2)}.hook_resid_{m.group(1)}", int(m.group(2))


def from_tl_hook(name: str | None) -> str | None:
    """TransformerLens's residual-stream hook names in our spelling; None for any other."""
    m = _TL_HOOK.match(name or "")
    return f"resid_{m.group(2)}.{m.group(1)}" if m else None


def stream_position(hook: str) -> int | None:
    """Layers applied before the hook, so that resid_post.L and resid_pre.L+1 compare equal."""
    m = _OUR_HOOK.match(hook)
    if not m:
        return None
    layer = int(m.group(2))
    return layer + 1 if m.group(1) == "post" else layer


# --- the SAELens forward pass ---------------------------------------------------------------


_SHAPES = {
    "W_enc": ("d_in", "d_sae"),
    "W_dec": ("d_sae", "d_in"),
    "b_enc": ("d_sae",),
    "b_dec": ("d_in",),
    "b_gate": ("d_sae",),
    "b_mag": ("d_sae",),
    "r_mag": ("d_sae",),
    "threshold": ("d_sae",),
}
TENSORS = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "gated": ("W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"),
}


class SAELensSAE(nn.Module):
    """An SAE computing SAELens's inference forward pass (float32, dictbench's interface).

    - standard: f = ReLU(x' W_enc + b_enc)
    - topk:     f = scatter of ReLU(top-k of x' W_enc + b_enc)
    - jumprelu: f = ReLU(pre) * 1[pre > ReLU(threshold)], pre = x' W_enc + b_enc
    - gated:    f = 1[x' W_enc + b_gate > 0] * ReLU(x' (W_enc * exp(r_mag)) + b_mag)

    with x' = x - b_dec when ``apply_b_dec_to_input``, else x; x_hat = f W_dec + b_dec.
    JumpReLU's ReLU on the threshold is SAELens 6's; SAELens 5 compares with the raw
    threshold, which gives the same f because a negative threshold only admits
    pre-activations that the ReLU then zeroes. TopK's ``rescale_acts_by_decoder_norm``
    (SAELens 6) and the SAELens 5 ``finetuning_scaling_factor`` are applied as there.
    """

    def __init__(
        self,
        architecture: str,
        d_in: int,
        d_sae: int,
        apply_b_dec_to_input: bool = True,
        k: int | None = None,
        rescale_acts_by_decoder_norm: bool = False,
    ):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise UserError(f"unknown SAELens architecture '{architecture}'")
        if architecture == "topk" and (k is None or k < 1):
            raise UserError("a topk SAE needs k >= 1")
        self.architecture = architecture
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.k = k
        self.rescale_acts_by_decoder_norm = bool(rescale_acts_by_decoder_norm)
        dims = {"d_in": d_in, "d_sae": d_sae}
        for name in TENSORS[architecture]:
            shape = tuple(dims[d] for d in _SHAPES[name])
            setattr(self, name, nn.Parameter(torch.zeros(shape), requires_grad=False))
        # SAELens 5's optional per-latent scale on f before decoding; None when unused.
        self.register_buffer("finetuning_scaling_factor", None)

    def _sae_in(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = self._sae_in(x.float())
        if self.architecture == "gated":
            gate = (x @ self.W_enc + self.b_gate) > 0
            mag = x @ (self.W_enc * self.r_mag.exp()) + self.b_mag
            return gate.to(mag.dtype) * torch.relu(mag)
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture == "jumprelu":
            return torch.relu(pre) * (pre > torch.relu(self.threshold)).to(pre.dtype)
        if self.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        vals, idx = pre.topk(min(int(self.k or 0), pre.shape[-1]), dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        if self.finetuning_scaling_factor is not None:
            f = f * self.finetuning_scaling_factor
        if self.architecture == "topk" and self.rescale_acts_by_decoder_norm:
            f = f * (1 / self.W_dec.norm(dim=-1))
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def state_for_saelens(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name).detach() for name in TENSORS[self.architecture]}


# --- dictbench SAE -> SAELens ----------------------------------------------------------------


def _copy_into(target: SAELensSAE, tensors: dict[str, torch.Tensor]) -> SAELensSAE:
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(target, name).copy_(value.detach().float().cpu())
    return target


def _standard(sae: Any, centre: bool, w_dec: torch.Tensor | None = None) -> SAELensSAE:
    d_sae, d_in = sae.W_dec.shape
    out = SAELensSAE("standard", d_in, d_sae, apply_b_dec_to_input=centre)
    w = sae.W_dec if w_dec is None else w_dec
    return _copy_into(out, {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": w, "b_dec": sae.b_dec})


def _gated(sae: Any) -> SAELensSAE:
    d_sae, d_in = sae.W_dec.shape
    names = TENSORS["gated"]
    return _copy_into(SAELensSAE("gated", d_in, d_sae), {n: getattr(sae, n) for n in names})


def _topk(sae: Any) -> SAELensSAE:
    d_sae, d_in = sae.W_dec.shape
    out = SAELensSAE("topk", d_in, d_sae, k=int(sae.cfg.k))
    return _copy_into(out, {n: getattr(sae, n) for n in TENSORS["topk"]})


def _jumprelu(sae: Any, threshold: torch.Tensor) -> SAELensSAE:
    d_sae, d_in = sae.W_dec.shape
    out = SAELensSAE("jumprelu", d_in, d_sae)
    tensors = {n: getattr(sae, n) for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    return _copy_into(out, {**tensors, "threshold": threshold.expand(d_sae)})


def _batchtopk(sae: Any) -> SAELensSAE:
    # At inference BatchTopK is pre * 1[pre > t] with one threshold t >= 0 (an EMA of
    # positive activations, 0 before training): SAELens's JumpReLU with every threshold t.
    return _jumprelu(sae, sae.threshold.detach().reshape(1))


# Registered baseline name -> converter. Matched on the exact registered class (see
# ``to_saelens``), so a subclass that changes encode is refused rather than mislabelled.
_CONVERTERS = {
    "l1": lambda s: _standard(s, centre=True),
    "l1_april": lambda s: _standard(s, centre=False),
    # e2e normalises decoder rows inside decode; SAELens gets the normalised rows.
    "e2e": lambda s: _standard(s, centre=False, w_dec=unit_rows(s.W_dec.detach())),
    "e2e_ds": lambda s: _standard(s, centre=False, w_dec=unit_rows(s.W_dec.detach())),
    "gated": _gated,
    "topk": _topk,
    "batchtopk": _batchtopk,
    "jumprelu": lambda s: _jumprelu(s, s.log_threshold.detach().exp()),
}


def exportable() -> list[str]:
    return sorted(_CONVERTERS)


def to_saelens(sae: nn.Module) -> SAELensSAE:
    """The SAELens module computing exactly what ``sae`` computes, or a UserError."""
    ref = class_ref(type(sae))
    if ref not in _CONVERTERS:
        raise UserError(
            f"baseline '{ref}' has no SAELens equivalent; exportable: {', '.join(exportable())}"
        )
    return _CONVERTERS[ref](sae).eval()


def saelens_config(
    module: SAELensSAE,
    hook: str,
    model: str,
    context_size: int | None,
    dataset: str | None,
    dictbench: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """cfg.json that SAELens 5 and 6 both load (see the module docstring)."""
    hook_name, layer = to_tl_hook(hook)
    d_sae, d_in = module.W_dec.shape
    topk = module.architecture == "topk"
    cfg: dict[str, Any] = {
        "architecture": module.architecture,
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "activation_fn_str": "topk" if topk else "relu",
        "activation_fn_kwargs": {"k": module.k} if topk else {},
        "apply_b_dec_to_input": module.apply_b_dec_to_input,
        "finetuning_scaling_factor": False,
        "context_size": context_size,
        "model_name": model,
        "hook_name": hook_name,
        "hook_layer": layer,
        "hook_head_index": None,
        # dictbench windows start with BOS where the tokenizer has one.
        "prepend_bos": True,
        "dataset_path": dataset,
        "dataset_trust_remote_code": False,
        "normalize_activations": "none",
        "dtype": "float32",
        "device": "cpu",
        "sae_lens_training_version": None,
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
        "seqpos_slice": [None],
    }
    if topk:
        cfg["k"] = module.k
        cfg["rescale_acts_by_decoder_norm"] = module.rescale_acts_by_decoder_norm
    if dictbench is not None:
        cfg["dictbench"] = dictbench  # ignored by SAELens; lets `dictbench eval` label it
    return cfg


def write_folder(out: Path, tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> Path:
    """Write both files into a fresh sibling folder, then rename it to ``out``: a reader
    sees no folder or a complete one. ``out`` must not exist, or be an empty folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not an empty folder; choose a new one")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise UserError(f"{out}: cannot write there ({e.strerror})") from e
    try:
        data = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
        atomic.write_bytes(tmp / WEIGHTS, save(data))
        atomic.write_json(tmp / CONFIG, cfg)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    atomic.fsync_dir(out.parent)
    return out


def recorded_run_spec(sae_dir: Path, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The resolved spec of the run that saved this SAE (``<run>/saes/<id>`` sits two
    levels below ``<run>/run.json``), when it is there and names the same hook."""
    run_json = sae_dir.parent.parent / "run.json"
    if sae_dir.parent.name != "saes" or not run_json.is_file():
        return None
    try:
        run = json.loads(run_json.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    spec = run.get("spec") if isinstance(run, dict) else None
    if not isinstance(spec, dict) or spec.get("hook") != cfg.get("hook"):
        return None
    return spec


def export(sae_dir: str | Path, out: str | Path, trust_code: bool = False) -> Path:
    """Write the dictbench SAE in ``sae_dir`` as a SAELens folder ``out``."""
    folder = sae_folder(sae_dir)
    sae, cfg = load_sae(folder, trust_code=trust_code)
    module = to_saelens(sae)
    for key in ("hook", "model"):
        if not isinstance(cfg.get(key), str):
            raise UserError(f"{folder / CONFIG}: no '{key}' recorded, which SAELens needs")
    spec = recorded_run_spec(folder, cfg)
    corpus = spec.get("corpus", {}) if spec else {}
    meta = {
        "baseline": cfg["baseline"],
        "sae_id": cfg.get("sae_id", folder.name),
        "config": cfg.get("config", {}),
        "hook": cfg["hook"],
        "model": cfg["model"],
        "run_spec": spec,
        "exported_from": str(folder),
    }
    saelens_cfg = saelens_config(
        module, cfg["hook"], cfg["model"], corpus.get("ctx_len"), corpus.get("name"), meta
    )
    return write_folder(Path(out), module.state_for_saelens(), saelens_cfg)


# --- SAELens folder -> SAELensSAE -------------------------------------------------------------


@dataclass
class SAELensInfo:
    """What a SAELens cfg.json says, in dictbench terms."""

    architecture: str
    d_in: int
    d_sae: int
    hook_name: str | None
    hook: str | None  # our spelling, None when the hook is not a residual stream point
    model_name: str | None
    context_size: int | None
    dictbench: dict[str, Any] | None
    k: int | None = None


def is_saelens_config(cfg: dict[str, Any]) -> bool:
    """dictbench's own cfg.json names a ``baseline``; SAELens's never does."""
    return "baseline" not in cfg


def _meta(cfg: dict[str, Any], key: str) -> Any:
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    return cfg.get(key, meta.get(key))


def _int_field(cfg: dict[str, Any], key: str, where: Path) -> int:
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{where}: '{key}' must be a positive integer, got {value!r}")
    return value


def _architecture(cfg: dict[str, Any], where: Path) -> tuple[str, int | None]:
    arch = cfg.get("architecture") or "standard"
    # SAELens 6 names no activation: the architecture implies it.
    act = (
        cfg.get("activation_fn")
        or cfg.get("activation_fn_str")
        or ("topk" if arch == "topk" else "relu")
    )
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k", kwargs.get("k") if isinstance(kwargs, dict) else None)
    if act == "topk" and arch == "standard":  # SAELens 5 spelled TopK as standard + topk
        arch = "topk"
    if arch not in ARCHITECTURES:
        raise UserError(
            f"{where}: SAELens architecture '{arch}' is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    if act not in ("relu", "topk") or (act == "topk") != (arch == "topk"):
        raise UserError(f"{where}: activation '{act}' with architecture '{arch}' is not supported")
    if arch == "topk" and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise UserError(f"{where}: a topk SAE needs an integer k >= 1, got {k!r}")
    return arch, k if arch == "topk" else None


def _check_supported(cfg: dict[str, Any], where: Path) -> None:
    """Refuse what we would otherwise compute wrongly, naming the field."""
    norm = cfg.get("normalize_activations")
    if norm not in (None, False, "none"):
        raise UserError(
            f"{where}: normalize_activations '{norm}' is not supported; an SAE saved with an "
            "unfolded input scale needs it folded into the weights first (SAELens: "
            "fold_activation_norm_scaling_factor)"
        )
    if _meta(cfg, "hook_head_index") is not None:
        raise UserError(f"{where}: per-head SAEs (hook_head_index) are not supported")
    if cfg.get("reshape_activations") not in (None, "none"):
        raise UserError(f"{where}: reshape_activations '{cfg['reshape_activations']}' unsupported")
    if cfg.get("normalize_decoder"):
        raise UserError(f"{where}: normalize_decoder is not supported")


def read_info(folder: Path, cfg: dict[str, Any]) -> SAELensInfo:
    where = folder / CONFIG
    _check_supported(cfg, where)
    arch, k = _architecture(cfg, where)
    hook_name = _meta(cfg, "hook_name") or _meta(cfg, "hook_point")
    context = _meta(cfg, "context_size")
    meta = cfg.get("dictbench")
    return SAELensInfo(
        architecture=arch,
        d_in=_int_field(cfg, "d_in", where),
        d_sae=_int_field(cfg, "d_sae", where),
        hook_name=hook_name,
        hook=from_tl_hook(hook_name),
        model_name=_meta(cfg, "model_name"),
        context_size=context if isinstance(context, int) else None,
        dictbench=meta if isinstance(meta, dict) else None,
        k=k,
    )


def _take_scaling(state: dict[str, torch.Tensor], cfg: dict[str, Any], weights: Path) -> Any:
    """SAELens 5's optional per-latent decoder-input scale; all ones means none."""
    names = [n for n in ("finetuning_scaling_factor", "scaling_factor") if n in state]
    if not names:
        return None
    scale = state.pop(names[0]).float()
    for extra in names[1:]:
        state.pop(extra)
    if torch.all(scale == 1):
        return None
    if not cfg.get("finetuning_scaling_factor"):
        raise UserError(f"{weights}: has a scaling factor but cfg.json says none is used")
    return scale


def load_saelens(path: str | Path) -> tuple[SAELensSAE, SAELensInfo]:
    """A SAELens folder as an inference module; every problem is one UserError line."""
    folder = sae_folder(path)
    cfg = read_config(folder / CONFIG)
    if not is_saelens_config(cfg):
        raise UserError(f"{folder / CONFIG}: a dictbench SAE, not a SAELens one")
    info = read_info(folder, cfg)
    arch, k = info.architecture, info.k
    weights = folder / WEIGHTS
    state = dict(load_tensors(weights))
    if "threshold" not in state and "log_threshold" in state and arch == "jumprelu":
        state["threshold"] = state.pop("log_threshold").float().exp()
    scaling = _take_scaling(state, cfg, weights)
    module = SAELensSAE(
        arch,
        info.d_in,
        info.d_sae,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        k=k,
        rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)),
    )
    expected = TENSORS[arch]
    missing = [n for n in expected if n not in state]
    if missing:
        raise UserError(f"{weights}: missing tensor(s) {', '.join(missing)} for a {arch} SAE")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise UserError(f"{weights}: unexpected tensor(s) {', '.join(unexpected)} for a {arch} SAE")
    for name in expected:
        want = tuple(getattr(module, name).shape)
        if tuple(state[name].shape) != want:
            raise UserError(
                f"{weights}: tensor {name} has shape {tuple(state[name].shape)}, expected {want} "
                f"(d_in {info.d_in}, d_sae {info.d_sae})"
            )
    _copy_into(module, {n: state[n] for n in expected})
    if scaling is not None:
        if tuple(scaling.shape) != (info.d_sae,):
            raise UserError(f"{weights}: scaling factor has shape {tuple(scaling.shape)}")
        module.finetuning_scaling_factor = scaling
    return module.eval(), info
