"""Run specs: plain YAML validated into dataclasses, with presets and ``--set`` overrides.

Validation is strict and early: an unknown field, a wrong type, an unknown
baseline or task, or an impossible budget is a ``SpecError`` naming the field,
raised before anything is written.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dictbench.corpus import CorpusSpec
from dictbench.errors import SpecError, UserError
from dictbench.subject import ModelSpec
from dictbench.synthetic import SyntheticSpec

DEFAULT_PRESET = "quickstart"
SOURCES = ("auto", "cache", "stream")
CACHE_DTYPES = ("float32", "float16", "bfloat16")
# budget.source auto: stream when the training cache would be larger than this.
STREAM_ABOVE_BYTES = 4 << 30


@dataclass
class BudgetSpec:
    """The common budget every SAE in a run trains under."""

    train_tokens: int = 500_000
    batch_size: int = 1024
    d_sae: int = 4608
    lr: float = 1e-3
    lr_warmup_frac: float = 0.05
    lr_decay_frac: float = 0.2
    # Activations are rescaled so E||x||^2 = d_in during training (folded back after),
    # which makes sparsity coefficients transfer across models and hook points.
    normalize_activations: bool = True
    # "bfloat16": each SAE's training loss (forward and backward) runs under
    # torch.autocast, so matmuls take bf16 inputs; weights, Adam and every evaluation
    # stay float32. None: float32 throughout.
    autocast: str | None = None
    # Where training activations come from (bench/batch_stream.py). "cache": harvested
    # once into a memory-mapped cache entry and reused by later runs; "stream": computed
    # by the model as training goes, no disk; "auto": stream when the cache would exceed
    # STREAM_ABOVE_BYTES, else cache.
    source: str = "auto"
    # The shuffle buffer: tokens are shuffled within blocks of this many (whole windows);
    # memory holds one block. One block covering the split is a global shuffle.
    buffer_tokens: int = 1 << 19
    # Element type of the training cache (float16 / bfloat16 halve its disk); evaluation
    # activations stay float32.
    cache_dtype: str = "float32"


@dataclass
class EvalSpec:
    tokens: int = 65_536
    downstream_tokens: int = 16_384
    batch_tokens: int = 8192


@dataclass
class BaselineEntry:
    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    # knob name -> list of values; one SAE per value (issue 3 grows this to grids).
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    id: str | None = None


@dataclass
class RunSpec:
    name: str = "run"
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    hook: str = "resid_post.6"
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    baselines: list[BaselineEntry] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    task_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    cache_dir: str | None = None
    out: str | None = None
    preset: str | None = None
    # Save each SAE's training state every this many steps (and always at the end), so
    # `dictbench run --resume` loses at most this much work; 0 saves only at the end.
    checkpoint_every_steps: int = 500
    # Devices the run's SAEs are spread over, round robin (e.g. [cuda:0, cuda:1]); the
    # subject model stays on model.device. None: every SAE on the model's device.
    devices: list[str] | None = None
    # Synthetic activations with a known dictionary instead of a model and corpus
    # (model, hook and corpus are then unused); see dictbench.synthetic.
    synthetic: SyntheticSpec | None = None
    # Train every planned SAE once per seed (its init and token order; the data split
    # stays from ``seed``); ids get ``@seed<N>``. None: one SAE per setting, seed ``seed``.
    seeds: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The spec as written into run.json: an API key given in task options is
        replaced by a marker (keys belong in environment variables)."""
        data = dataclasses.asdict(self)
        for opts in data["task_options"].values():
            if isinstance(opts, dict) and opts.get("api_key") is not None:
                opts["api_key"] = "<redacted>"
        return data


# --- generic dataclass construction with type checks ----------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except SpecError as e:
                errors.append(str(e))
        raise SpecError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {type(value).__name__}")
        return build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise SpecError(f"{where}: expected a list, got {type(value).__name__}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise SpecError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 1e-3 without a dot as a string; accept it as a number.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"{where}: expected a string, got {value!r}")
        return value
    raise SpecError(f"{where}: unsupported type {_type_name(tp)}")


def build(cls: type, data: dict[str, Any], where: str = "spec") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise SpecError(f"{where}.{key}: unknown field (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


# --- presets, files and overrides ------------------------------------------------------


def preset_names() -> list[str]:
    folder = resources.files("dictbench") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, origin: str) -> dict[str, Any]:
    from dictbench import safe_yaml  # aliases, duplicate keys and empty files refused

    try:
        data = safe_yaml.loads(text, origin)
    except UserError as e:
        raise SpecError(str(e)) from None
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: the spec must be a YAML mapping")
    return data


def _read_yaml_file(path: Path) -> dict[str, Any]:
    """A spec file: unreadable, non-UTF-8, empty or hostile files are one-line SpecErrors."""
    from dictbench import safe_yaml

    try:
        data = safe_yaml.load_path(path)
    except UserError as e:
        raise SpecError(str(e)) from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the spec must be a YAML mapping")
    return data


def load_preset_dict(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise SpecError(f"preset: unknown preset '{name}' (known: {', '.join(preset_names())})")
    text = (resources.files("dictbench") / "presets" / f"{name}.yaml").read_text()
    return _read_yaml(text, f"preset {name}")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """``a.b.c=value``; the value is parsed as YAML (so numbers and lists work)."""
    if "=" not in assignment:
        raise SpecError(f"--set {assignment}: expected key=value")
    key, raw = assignment.split("=", 1)
    from dictbench import safe_yaml

    try:
        value = safe_yaml.loads(raw, f"--set {key}", allow_empty=True)
    except UserError as e:
        raise SpecError(f"--set {key}: value is not valid YAML ({e})") from None
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise SpecError(f"--set {key}: no list item {part}")
            node = node[int(part)]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise SpecError(f"--set {key}: no list item {last}")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise SpecError(f"--set {key}: '{'.'.join(parts[:-1])}' is not a mapping")


def replace_baselines(data: dict[str, Any], refs: list[str] | None) -> None:
    """``--baseline REF`` (repeatable): these methods replace the spec's baselines. Done
    before ``--set`` is applied, so ``--set baselines.0.params.k=3`` edits them."""
    if refs:
        data["baselines"] = [{"method": ref} for ref in refs]


def resolve(
    spec_path: str | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    baselines: list[str] | None = None,
) -> RunSpec:
    data: dict[str, Any] = {}
    if spec_path is not None:
        path = Path(spec_path)
        if not path.is_file():
            raise SpecError(f"spec: no such file '{spec_path}'")
        data = _read_yaml_file(path)
    base_name = preset or data.get("preset") or (None if spec_path else DEFAULT_PRESET)
    if base_name is not None:
        if not isinstance(base_name, str):
            raise SpecError("spec.preset: expected a preset name")
        data = _merge(load_preset_dict(base_name), data)
        data["preset"] = base_name
    replace_baselines(data, baselines)
    for ov in overrides or []:
        apply_override(data, ov)
    spec = build(RunSpec, data)
    validate(spec)
    return spec


def validate(spec: RunSpec) -> None:
    from dictbench import registry

    b, e, c = spec.budget, spec.eval, spec.corpus
    positive = {
        "budget.d_sae": b.d_sae,
        "budget.batch_size": b.batch_size,
        "budget.train_tokens": b.train_tokens,
        "eval.tokens": e.tokens,
        "eval.downstream_tokens": e.downstream_tokens,
        "eval.batch_tokens": e.batch_tokens,
    }
    for name, value in positive.items():
        if value <= 0:
            raise SpecError(f"{name}: must be positive, got {value}")
    if b.lr <= 0:
        raise SpecError(f"budget.lr: must be positive, got {b.lr}")
    if b.train_tokens < b.batch_size:
        raise SpecError(
            f"budget.train_tokens: {b.train_tokens} tokens is less than one batch "
            f"(budget.batch_size {b.batch_size})"
        )
    for name, frac in (("lr_warmup_frac", b.lr_warmup_frac), ("lr_decay_frac", b.lr_decay_frac)):
        if not 0 <= frac <= 1:
            raise SpecError(f"budget.{name}: must be in [0, 1], got {frac}")
    if b.lr_warmup_frac + b.lr_decay_frac > 1:
        raise SpecError("budget.lr_warmup_frac + budget.lr_decay_frac: must not exceed 1")
    if b.autocast not in (None, "bfloat16"):
        raise SpecError(
            f"budget.autocast: must be bfloat16 or null, got {b.autocast!r} (float16 would "
            "need loss scaling, which dictbench does not do)"
        )
    if b.source not in SOURCES:
        raise SpecError(f"budget.source: must be one of {', '.join(SOURCES)}, got {b.source!r}")
    if b.buffer_tokens <= 0:
        raise SpecError(f"budget.buffer_tokens: must be positive, got {b.buffer_tokens}")
    if b.cache_dtype not in CACHE_DTYPES:
        raise SpecError(
            f"budget.cache_dtype: must be one of {', '.join(CACHE_DTYPES)}, got {b.cache_dtype!r}"
        )
    if not 0 < c.eval_fraction < 1:
        raise SpecError(f"corpus.eval_fraction: must be in (0, 1), got {c.eval_fraction}")
    if c.ctx_len < 3:
        raise SpecError(f"corpus.ctx_len: must be at least 3, got {c.ctx_len}")
    if spec.model.dtype not in ("float32", "float16", "bfloat16", "float64"):
        raise SpecError(f"model.dtype: unknown dtype '{spec.model.dtype}'")
    if not spec.baselines:
        raise SpecError("baselines: at least one baseline is needed")
    if not spec.tasks:
        raise SpecError("tasks: at least one task is needed")
    for i, entry in enumerate(spec.baselines):
        where = f"baselines[{i}]"
        if not entry.method:
            raise SpecError(f"{where}.method: missing")
        try:
            cls = registry.get_baseline(entry.method)
        except UserError as err:
            raise SpecError(f"{where}.method: {err}") from err
        lacking = registry.missing_for_budget(cls, spec.budget.normalize_activations)
        if lacking:
            raise SpecError(f"{where}.method: baseline '{entry.method}' {lacking}")
        known = set(getattr(cls.config_class, "__dataclass_fields__", {}))
        keys = [("params", k) for k in entry.params] + [("sweep", k) for k in entry.sweep]
        for section, key in keys:
            if key not in known or key in ("d_in", "d_sae"):
                raise SpecError(
                    f"{where}.{section}.{key}: not a hyperparameter of {entry.method} "
                    f"(known: {', '.join(sorted(known - {'d_in', 'd_sae'}))})"
                )
        for key, values in entry.sweep.items():
            if not values:
                raise SpecError(f"{where}.sweep.{key}: empty list")
    for i, task in enumerate(spec.tasks):
        try:
            registry.get_task(task)
        except UserError as err:
            raise SpecError(f"tasks[{i}]: {err}") from err
    for task, opts in spec.task_options.items():
        if task not in spec.tasks:
            raise SpecError(f"task_options.{task}: not one of this run's tasks")
        check = getattr(registry.get_task(task), "validate_options", None)
        if check is not None:  # a task that checks its own options fails the spec early
            check(opts)
    if spec.synthetic is not None:
        spec.synthetic.validate()
    else:
        for i, task in enumerate(spec.tasks):
            if getattr(registry.get_task(task), "needs_ground_truth", False):
                raise SpecError(
                    f"tasks[{i}]: {task} needs a known dictionary; add a synthetic: section"
                )
    if spec.seeds is not None and (
        not spec.seeds or len(set(spec.seeds)) != len(spec.seeds) or min(spec.seeds) < 0
    ):
        raise SpecError(f"seeds: expected distinct non-negative integers, got {spec.seeds}")
    if spec.checkpoint_every_steps < 0:
        raise SpecError(
            f"checkpoint_every_steps: must be 0 (only at the end) or positive, "
            f"got {spec.checkpoint_every_steps}"
        )
    if "." not in spec.hook:
        raise SpecError(f"hook: '{spec.hook}' is not a hook point; use resid_post.L or resid_pre.L")
