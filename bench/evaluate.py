"""`dictbench eval`: score saved SAEs, dictbench's or any other library's, with dictbench's tasks.

What it reads: dictbench, SAELens, sparsify, dictionary_learning and Gemma Scope
folders, local or from the hub (``dictbench.io.formats``); many at once, grouped by the
spec they resolve to so that SAEs at one model and hook share everything that does
not depend on the SAE (``dictbench.eval_groups``), with all records in one folder.

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
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dictbench import __version__
from dictbench.console import check_writable, log
from dictbench.data.subject import SubjectModel
from dictbench.errors import UserError
from dictbench.eval_groups import Group, prepare_group, score
from dictbench.io import atomic, formats, saelens
from dictbench.io.formats import sources
from dictbench.io.sae_io import CONFIG, load_sae, read_config
from dictbench.report.leaderboard import table
from dictbench.spec import (
    DEFAULT_PRESET,
    BaselineEntry,
    RunSpec,
    apply_override,
    build,
    load_preset_dict,
    on_preset,
    read_spec_file,
    validate,
)


@dataclass
class LoadedSAE:
    """A saved SAE ready to score, with what its folder says about where it came from."""

    module: torch.nn.Module
    sae_id: str
    method: str  # the ``baseline`` its records carry
    fmt: str  # "dictbench", "saelens", "sparsify", "dictionary_learning", "gemma_scope"
    hook: str | None  # our spelling; None if unknown or not a residual-stream point
    hook_name: str | None  # as the SAE's cfg.json spells it
    model: str | None
    d_in: int
    run_spec: dict[str, Any] | None
    path: Path
    # The hub id of the model a SAELens release names: the default model to score on.
    release_model: str | None = None


def load_any(path: str | Path, trust_code: bool = False) -> LoadedSAE:
    """An SAE folder in any supported format (see dictbench.io.formats); pickles refused,
    except dictionary_learning's ae.pt, read with torch.load(weights_only=True)."""
    fmt, folder = formats.detect(path)
    if fmt != "saelens_layout":
        c = formats.load_foreign(fmt, folder)
        return LoadedSAE(
            module=c.module,
            sae_id=folder.name,
            method=c.method,
            fmt=c.fmt,
            hook=c.hook,
            hook_name=c.hook_name,
            model=c.model,
            d_in=c.d_in,
            run_spec=None,
            path=folder,
        )
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


def _base_spec(loaded: LoadedSAE, spec_path: str | None, preset: str | None) -> tuple[dict, str]:
    if spec_path or preset:
        data = read_spec_file(spec_path, "--spec") if spec_path else {}
        data = on_preset(data, preset or data.get("preset"))
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
    if loaded.release_model:
        data["model"] = {**(data.get("model") or {}), "name": loaded.release_model}
        return data, f"preset {DEFAULT_PRESET} on the release's model at the SAE's hook"
    return data, f"preset {DEFAULT_PRESET} at the SAE's hook"


def resolve_spec(
    loaded: LoadedSAE,
    spec_path: str | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    tasks: list[str] | None = None,
    follow_hook: bool = False,
) -> tuple[RunSpec, str]:
    """The validated spec to score under and a phrase saying where it came from.
    ``follow_hook`` (several SAEs in one eval): a given spec's hook becomes the SAE's
    own, so one spec serves SAEs at every layer; ``--set hook=`` still wins."""
    data, source = _base_spec(loaded, spec_path, preset)
    if follow_hook and loaded.hook is not None:
        data["hook"] = loaded.hook
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


@dataclass(frozen=True)
class EvalRequest:
    """What `dictbench eval` is asked besides which SAEs: the spec to score under
    (``--spec``/``--preset``, ``--set`` overrides, ``--tasks``), where the records go and
    under which id, the mean-ablation token count, and how the SAEs are read
    (``--trust-code``, ``--match``). One object: the command line hands them over together."""

    spec_path: str | None = None
    preset: str | None = None
    overrides: list[str] | None = None
    tasks: list[str] | None = None
    out: str | Path | None = None
    sae_id: str | None = None
    mean_tokens: int | None = None
    trust_code: bool = False
    match: str | None = None


def _groups(loaded: list[LoadedSAE], req: EvalRequest) -> list[Group]:
    groups: dict[str, Group] = {}
    follow = len(loaded) > 1
    for sae in loaded:
        spec, source = resolve_spec(
            sae, req.spec_path, req.preset, req.overrides, req.tasks, follow_hook=follow
        )
        key = json.dumps(spec.to_dict(), sort_keys=True, default=str)
        groups.setdefault(key, Group(spec, source, [])).saes.append(sae)
    return list(groups.values())


def load_sources(
    paths: list[str | Path], match: str | None = None, trust_code: bool = False
) -> list[LoadedSAE]:
    """Every SAE the arguments name (see dictbench.io.formats.sources), loaded and checked,
    with ids made unique so that no two write the same records."""
    loaded = []
    for src in sources.expand([str(p) for p in paths], match):
        sae = load_any(src.folder, trust_code=trust_code)
        if src.sae_id:
            sae.sae_id = src.sae_id
        if src.hub is not None and src.hub.model:
            sae.release_model = sae.model = src.hub.model
        loaded.append(sae)
    for sae, new_id in zip(loaded, sources.unique_ids([s.sae_id for s in loaded]), strict=True):
        sae.sae_id = new_id
    return loaded


def evaluate(path: str | Path, **kwargs: Any) -> Path:
    """Score the SAE at ``path``; ``kwargs`` are :class:`EvalRequest`'s fields (see
    :func:`evaluate_many`). Returns the output folder."""
    return evaluate_many([path], EvalRequest(**kwargs))


def evaluate_many(paths: list[str | Path], req: EvalRequest | None = None) -> Path:
    """Score every SAE the paths name and write their records into one run folder.
    Everything is loaded and checked (formats, specs, widths, corpus) before anything is
    written; with several SAEs their weights are then let go and read again a chunk at a
    time (as many as share the clean downstream passes within a memory budget:
    ``eval_groups.together_budget``), so a whole release never sits in memory at once."""
    req = req or EvalRequest()
    t0 = time.perf_counter()
    loaded = load_sources(paths, match=req.match, trust_code=req.trust_code)
    if req.sae_id:
        if len(loaded) > 1:
            raise UserError("--sae-id: names one SAE, but the arguments name several")
        loaded[0].sae_id = req.sae_id
    groups = _groups(loaded, req)
    default = f"eval-{loaded[0].sae_id}" if len(loaded) == 1 else f"eval-{len(loaded)}-saes"
    out_dir = Path(req.out) if req.out else Path("runs") / default
    subjects: dict[str, SubjectModel] = {}
    prepared = [prepare_group(group, subjects, req.mean_tokens) for group in groups]
    if len(loaded) > 1:
        for sae in loaded:
            sae.module = None  # type: ignore[assignment]  # read again when scored
    check_writable(out_dir)
    info: dict[str, Any] = {"status": "running", "saes": [], "groups": []}
    info["versions"] = {"dictbench": __version__, "torch": torch.__version__}
    for group, prep in zip(groups, prepared, strict=True):
        score(group, prep, out_dir, info, lambda p: load_any(p, trust_code=req.trust_code))
    info.update(status="complete", wall_seconds=time.perf_counter() - t0)
    if len(loaded) == 1:  # the single-SAE layout eval.json has always had
        info["sae"] = info["saes"][0]
        group = info["groups"][0]
        info.update({k: group[k] for k in ("spec_source", "spec", "train_mean", "caches")})
    atomic.write_json(out_dir / "eval.json", info)
    log("")
    log(table(out_dir))
    log(f"\nresults in {out_dir}; total wall time {info['wall_seconds']:.1f} s")
    return out_dir
