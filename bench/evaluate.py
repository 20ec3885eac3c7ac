"""`dictbench eval`: score one saved SAE, dictbench's or SAELens's, with dictbench's tasks.

The scoring is the run's own: the same evaluation split through the activation
cache, the same task environment (``runner.build_env``), the same records
(``runner.score_sae`` with ``runner.record_context``). So an SAE evaluated here under
the spec of the run that trained it gets the records that run wrote, and an SAE
trained elsewhere gets numbers comparable with a run under the same spec.

Which spec. ``--spec``/``--preset`` when given; else the spec recorded with the SAE
(run.json next to a dictbench run's ``saes/`` folder, or the copy ``dictbench export``
puts in cfg.json); else the quickstart preset at the SAE's own hook. The model must
be the one the SAE was trained on: dictbench checks the hook and the width (d_in),
and says so when the SAE names another model.

The mean-ablation baseline (``ce_mean``) needs the mean *training* activation. The
run's training cache is reused when it exists, which makes the records identical
to the run's. Otherwise only ``--mean-tokens`` training tokens (default: as many as
the evaluation split) are harvested rather than the whole training budget;
eval.json says which.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from dictbench import __version__, atomic, registry, saelens
from dictbench.cache import ActivationStore, default_cache_root, prepare, run_harvest
from dictbench.errors import SpecError, UserError
from dictbench.leaderboard import table
from dictbench.runner import build_env, record_context, score_sae
from dictbench.sae_io import CONFIG, load_sae, read_config, sae_folder
from dictbench.spec import (
    DEFAULT_PRESET,
    BaselineEntry,
    RunSpec,
    apply_override,
    build,
    load_preset_dict,
    validate,
)
from dictbench.subject import SubjectModel


def log(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class LoadedSAE:
    """A saved SAE ready to score, with what its folder says about where it came from."""

    module: torch.nn.Module
    sae_id: str
    method: str  # the ``baseline`` its records carry
    fmt: str  # "dictbench" or "saelens"
    hook: str | None  # our spelling; None if unknown or not a residual-stream point
    hook_name: str | None  # as the SAE's cfg.json spells it
    model: str | None
    d_in: int
    run_spec: dict[str, Any] | None
    path: Path


def load_any(path: str | Path, trust_code: bool = False) -> LoadedSAE:
    """A dictbench or SAELens SAE folder (safetensors only; pickles are refused)."""
    folder = sae_folder(path)
    cfg = read_config(folder / CONFIG)
    if saelens.is_saelens_config(cfg):
        module, info = saelens.load_saelens(folder)
        meta = info.dictbench or {}
        spec = meta.get("run_spec")
        return LoadedSAE(
            module=module,
            sae_id=str(meta.get("sae_id") or folder.name),
            method=str(meta.get("baseline") or f"saelens-{info.architecture}"),
            fmt="saelens",
            hook=info.hook,
            hook_name=info.hook_name,
            model=meta.get("model") or info.model_name,
            d_in=info.d_in,
            run_spec=spec if isinstance(spec, dict) else None,
            path=folder,
        )
    module, cfg = load_sae(folder, trust_code=trust_code)
    hook = cfg.get("hook") if isinstance(cfg.get("hook"), str) else None
    return LoadedSAE(
        module=module,
        sae_id=str(cfg.get("sae_id") or folder.name),
        method=str(cfg["baseline"]),
        fmt="dictbench",
        hook=hook if saelens.stream_position(hook or "") is not None else None,
        hook_name=hook,
        model=cfg.get("model"),
        d_in=int(module.W_dec.shape[1]),
        run_spec=saelens.recorded_run_spec(folder, cfg),
        path=folder,
    )


# --- which spec ---------------------------------------------------------------------------


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_spec_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"--spec: no such file '{path}'")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the spec must be a YAML mapping")
    return data


def _base_spec(loaded: LoadedSAE, spec_path: str | None, preset: str | None) -> tuple[dict, str]:
    if spec_path or preset:
        data = _read_spec_file(spec_path) if spec_path else {}
        base = preset or data.get("preset")
        if base is not None:
            if not isinstance(base, str):
                raise SpecError("spec.preset: expected a preset name")
            data = {**_merge(load_preset_dict(base), data), "preset": base}
        return data, f"--spec {spec_path}" if spec_path else f"--preset {preset}"
    if loaded.run_spec is not None:
        data = copy.deepcopy(loaded.run_spec)
        for opts in (data.get("task_options") or {}).values():
            # run.json redacts API keys; the task then reads its environment variable.
            if isinstance(opts, dict) and opts.get("api_key") == "<redacted>":
                del opts["api_key"]
        return data, "recorded with the SAE"
    if loaded.hook is None:
        raise UserError(
            f"{loaded.path}: the SAE's hook {loaded.hook_name!r} is not a residual-stream "
            "point dictbench can splice (resid_pre.L / resid_post.L); pass --spec to say "
            "where it belongs"
        )
    data = {**load_preset_dict(DEFAULT_PRESET), "preset": DEFAULT_PRESET, "hook": loaded.hook}
    return data, f"preset {DEFAULT_PRESET} at the SAE's hook"


def resolve_spec(
    loaded: LoadedSAE,
    spec_path: str | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    tasks: list[str] | None = None,
) -> tuple[RunSpec, str]:
    """The validated spec to score under and a phrase saying where it came from."""
    data, source = _base_spec(loaded, spec_path, preset)
    for ov in overrides or []:
        apply_override(data, ov)
    if tasks:
        data["tasks"] = list(tasks)
        options = data.get("task_options") or {}
        data["task_options"] = {k: v for k, v in options.items() if k in tasks}
    data["out"] = None  # never the training run's folder
    # Scoring trains nothing: the spec's baselines are dropped (a recorded spec may name a
    # class that is not importable here), and the rest is validated with a stand-in entry
    # rather than a second copy of the rules.
    data["baselines"] = []
    spec = build(RunSpec, data)
    validate(_with_stand_in(spec))
    _check_hook(loaded, spec)
    return spec, source


def _with_stand_in(spec: RunSpec) -> RunSpec:
    stand_in = copy.copy(spec)
    stand_in.baselines = [BaselineEntry(method="l1")]
    return stand_in


def _check_hook(loaded: LoadedSAE, spec: RunSpec) -> None:
    if loaded.hook_name is None:
        return
    if loaded.hook is None:
        raise UserError(
            f"{loaded.path}: the SAE's hook {loaded.hook_name!r} is not a residual-stream point "
            "dictbench can splice (resid_pre.L / resid_post.L)"
        )
    if saelens.stream_position(loaded.hook) != saelens.stream_position(spec.hook):
        raise UserError(
            f"hook: the spec hooks {spec.hook} but the SAE was trained at {loaded.hook_name}; "
            f"pass --set hook={loaded.hook}"
        )


# --- scoring ------------------------------------------------------------------------------


# eval.json's name for a mean over part of the training split (not the run's mean).
PARTIAL_MEAN = "training split, part"


def _train_mean(
    subject: SubjectModel, spec: RunSpec, root: Path, mean_tokens: int | None
) -> tuple[Any, dict[str, Any]]:
    """The store whose mean is the mean-ablation baseline, and what eval.json says of it."""

    def pending(n: int) -> Any:
        return prepare(subject, spec.hook, spec.corpus, "train", n, spec.seed, root, log=log)

    if mean_tokens is None:
        full = pending(spec.budget.train_tokens)
        if isinstance(full, ActivationStore):
            return full, {"source": "training cache of the spec", "tokens": full.n_tokens}
        n = min(spec.budget.train_tokens, spec.eval.tokens)
        if n == spec.budget.train_tokens:
            return full, {"source": "training split of the spec", "tokens": n}
    else:
        if mean_tokens <= 0:
            raise UserError(f"--mean-tokens: must be positive, got {mean_tokens}")
        n = mean_tokens
    return pending(n), {"source": PARTIAL_MEAN, "tokens": n}


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out: cannot write to '{out}' ({e.strerror})") from e


def evaluate(
    path: str | Path,
    spec_path: str | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    tasks: list[str] | None = None,
    out: str | Path | None = None,
    sae_id: str | None = None,
    mean_tokens: int | None = None,
    trust_code: bool = False,
) -> Path:
    """Score the SAE at ``path`` and write its records under ``out``; returns ``out``."""
    t0 = time.perf_counter()
    loaded = load_any(path, trust_code=trust_code)
    if sae_id:
        loaded.sae_id = sae_id
    spec, source = resolve_spec(loaded, spec_path, preset, overrides, tasks)
    out_dir = Path(out) if out else Path("runs") / f"eval-{loaded.sae_id}"
    log(f"scoring {loaded.fmt} SAE {loaded.sae_id} ({loaded.method}) from {loaded.path}")
    log(f"spec: {spec.name} ({source}); hook {spec.hook}; tasks {', '.join(spec.tasks)}")
    if loaded.model and loaded.model != spec.model.name:
        log(f"note: the SAE names model {loaded.model!r}; scoring on {spec.model.name!r}")

    log(f"loading subject model {spec.model.name} ...")
    subject = SubjectModel.load(spec.model)
    subject.stream_position(spec.hook)
    if loaded.d_in != subject.d_model:
        raise UserError(
            f"{loaded.path}: the SAE reads {loaded.d_in}-dimensional activations but "
            f"{spec.model.name} has d_model {subject.d_model}; pass --spec or --preset naming "
            "the model it was trained on"
        )
    root = Path(spec.cache_dir) if spec.cache_dir else default_cache_root()
    pending_eval = prepare(
        subject, spec.hook, spec.corpus, "eval", spec.eval.tokens, spec.seed, root, log=log
    )
    pending_mean, mean_info = _train_mean(subject, spec, root, mean_tokens)

    _check_writable(out_dir)
    info: dict[str, Any] = {
        "status": "running",
        "sae": {
            "path": str(loaded.path),
            "format": loaded.fmt,
            "sae_id": loaded.sae_id,
            "baseline": loaded.method,
            "hook": loaded.hook_name,
            "model": loaded.model,
        },
        "spec_source": source,
        "spec": spec.to_dict(),
        "train_mean": mean_info,
        "versions": {"dictbench": __version__, "torch": torch.__version__},
        "device": subject.device,
    }
    atomic.write_json(out_dir / "eval.json", info)

    eval_store = run_harvest(subject, spec.hook, pending_eval, log=log)
    mean_store = run_harvest(subject, spec.hook, pending_mean, log=log)
    env = build_env(spec, subject, mean_store.mean, eval_store)
    context = record_context(spec, subject, eval_store)
    task_objs = [registry.get_task(name)() for name in spec.tasks]
    module = loaded.module.to(subject.device).eval()
    task_context = {}
    if mean_info["source"] == PARTIAL_MEAN:
        # Not the mean a run of this spec ablates with: its records must not be compared
        # with a run's as if they were (the leaderboard and `check` refuse the mix).
        n_mean = mean_info["tokens"]
        task_context["downstream"] = {"mean_ablation": f"first {n_mean} training tokens"}
    score_sae(module, loaded.sae_id, loaded.method, task_objs, env, out_dir, context, task_context)

    info.update(status="complete", wall_seconds=time.perf_counter() - t0)
    info["caches"] = {"eval": str(eval_store.path), "train_mean": str(mean_store.path)}
    atomic.write_json(out_dir / "eval.json", info)
    log("")
    log(table(out_dir))
    log(f"\nresults in {out_dir}; total wall time {info['wall_seconds']:.1f} s")
    return out_dir
