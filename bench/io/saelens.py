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
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from dictbench.errors import UserError
from dictbench.io import atomic
from dictbench.io.sae_io import (
    CONFIG,
    WEIGHTS,
    class_ref,
    load_sae,
    load_tensors,
    read_config,
    sae_folder,
)
from dictbench.io.saelens_module import (  # noqa: F401 - re-exported: importers use these names
    ARCHITECTURES,
    TENSORS,
    SAELensSAE,
    from_tl_hook,
    stream_position,
    to_tl_hook,
)

# --- dictbench SAE -> SAELens ----------------------------------------------------------------


def _copy_into(target: SAELensSAE, tensors: dict[str, torch.Tensor]) -> SAELensSAE:
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(target, name).copy_(value.detach().float().cpu())
    return target


_EXTRA_KEYS = {"apply_b_dec_to_input", "k", "rescale_acts_by_decoder_norm"}


def _exporter(cls: type) -> Any:
    """The class's own ``saelens_export`` (declared in its body, not inherited: a subclass
    that changes ``encode`` is refused rather than mislabelled), or None."""
    return vars(cls).get("saelens_export")


def exportable() -> list[str]:
    """Registered baselines that declare their SAELens export."""
    from dictbench import registry

    names = registry.baseline_names()
    return sorted(n for n in names if _exporter(registry.get_baseline(n)) is not None)


def _module_from(ref: str, declared: Any) -> SAELensSAE:
    try:
        architecture, tensors, extra = declared
    except (TypeError, ValueError):
        raise UserError(
            f"baseline '{ref}': saelens_export must return (architecture, tensors, extra)"
        ) from None
    if architecture not in ARCHITECTURES:
        raise UserError(
            f"baseline '{ref}': saelens_export names architecture '{architecture}' "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    want = set(TENSORS[architecture])
    if set(tensors) != want:
        raise UserError(
            f"baseline '{ref}': a SAELens {architecture} SAE has tensors "
            f"{', '.join(TENSORS[architecture])}; saelens_export gave {', '.join(sorted(tensors))}"
        )
    unknown = sorted(set(extra) - _EXTRA_KEYS)
    if unknown:
        raise UserError(f"baseline '{ref}': saelens_export: unknown setting '{unknown[0]}'")
    d_sae, d_in = tensors["W_dec"].shape
    out = SAELensSAE(architecture, int(d_in), int(d_sae), **extra)
    for name, value in tensors.items():
        shape = tuple(getattr(out, name).shape)
        if tuple(value.shape) != shape:
            raise UserError(
                f"baseline '{ref}': saelens_export tensor {name} has shape "
                f"{tuple(value.shape)}, expected {shape}"
            )
    return _copy_into(out, tensors)


def to_saelens(sae: nn.Module) -> SAELensSAE:
    """The SAELens module computing exactly what ``sae`` computes, or a UserError.

    The class says what it is at inference (``saelens_export``); any class may, so a
    third-party method exports too."""
    ref = class_ref(type(sae))
    export_fn = _exporter(type(sae))
    if export_fn is None:
        raise UserError(
            f"baseline '{ref}' has no SAELens equivalent; exportable: {', '.join(exportable())}"
        )
    return _module_from(ref, export_fn(sae)).eval()


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
    # Imported here: dictbench.io.formats reads SAELens modules, so it imports this module.
    from dictbench.io.formats.base import positive_int

    where = folder / CONFIG
    _check_supported(cfg, where)
    arch, k = _architecture(cfg, where)
    hook_name = _meta(cfg, "hook_name") or _meta(cfg, "hook_point")
    context = _meta(cfg, "context_size")
    meta = cfg.get("dictbench")
    return SAELensInfo(
        architecture=arch,
        d_in=positive_int(cfg.get("d_in"), "d_in", where),
        d_sae=positive_int(cfg.get("d_sae"), "d_sae", where),
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
