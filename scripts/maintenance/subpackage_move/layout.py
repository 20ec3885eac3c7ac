"""The layout the move produces: which flat module of bench/ goes into which stage.

Why a table of its own: apply_move.py (the mover), move_extras.py (pyproject, README,
the layout test) and the generated tests/test_layout.py all read the same decision, so it
is written once. Edit it here, then re-run apply_move.py: the mover is idempotent.

Stages follow a run (data -> train -> score -> report) with ``io`` under all of them.
What each stage may import is STAGE_IMPORTS; the stage DAG has no cycle:
io <- data <- score <- train, and score <- report (train writes its record through
score.records, so score sits below train in the imports though after it in a run).
"""

from __future__ import annotations

# Stage -> (one-paragraph docstring of its __init__.py, entries of bench/ it receives).
# An entry is a module name (bench/<name>.py) or a folder (bench/<name>/, moved whole).
STAGES: dict[str, tuple[str, list[str]]] = {
    "io": (
        "Files on disk: atomic writes, the one-writer lock of a run folder, YAML read\n"
        "safely, and SAEs saved and loaded in dictbench's own layout, SAELens's and other\n"
        "libraries' (``formats``). Why a stage of its own: every other stage reads or\n"
        "writes through these modules, and they import no stage, so they sit at the\n"
        "bottom of the import graph.",
        ["atomic", "lock", "safe_yaml", "sae_io", "saelens", "saelens_module", "formats"],
    ),
    "data": (
        "Where activations come from: the subject model and its hooks, the corpus and its\n"
        "splits, the on-disk activation cache, synthetic data with a known dictionary\n"
        "(ours and SynthSAEBench's), GGUF headers read without the weights and a GGUF\n"
        "model's de-quantised weights kept on disk. It imports only ``dictbench.io`` and\n"
        "the shared top-level modules, so it can be used without any trainer.",
        [
            "subject",
            "corpus",
            "cache",
            "synthetic",
            "synthetic_model",
            "synthsaebench",
            "cache_entry",
            "model_cache",
            "gguf_header",
        ],
    ),
    "score": (
        "Scoring shared by ``dictbench run`` and ``dictbench eval``: one SAE's pass over\n"
        "the tasks (``scoring``), each metric's declaration (better direction, tolerance,\n"
        "headline) and where those facts are read from, the result records that carry\n"
        "them, and what task modules share (the LLM judge, the SAE-independent results of\n"
        "``dictbench eval``). The tasks themselves are ``dictbench.tasks``; training writes\n"
        "its own ``training`` record through ``records`` here.",
        [
            "scoring",
            "metric_meta",
            "training_metrics",
            "metric_facts",
            "records",
            "judge",
            "eval_shared",
        ],
    ),
    "train": (
        "Training: the shared loop, the shuffled stream of batches it draws, lockstep\n"
        "groups of SAEs stepping on one batch, the data-parallel pieces and process\n"
        "groups, checkpoints and resume. It reads activations from ``dictbench.data`` and\n"
        "writes records through ``dictbench.score``; no other stage imports it.",
        [
            "batch_stream",
            "trainer",
            "trainer_dp",
            "lockstep",
            "run_training",
            "checkpoint",
            "resume",
            "distributed",
        ],
    ),
    "report": (
        "Reading records back: the leaderboard and its tables, methods at matched L0, seed\n"
        "statistics and intervals, Pareto plots, the static HTML page and the regression\n"
        "check (``dictbench check``, with its noise-aware variant). It imports\n"
        "``dictbench.score`` for each metric's facts and never training or data, so\n"
        "reading results never loads a model.",
        [
            "leaderboard",
            "leaderboard_compat",
            "leaderboard_defaults",
            "leaderboard_load",
            "leaderboard_render",
            "leaderboard_tables",
            "matched_l0",
            "seed_stats",
            "seed_tables",
            "plots",
            "plots_seeds",
            "html_page",
            "check",
            "noise_check",
        ],
    ),
}

# The other stages each stage may import (itself and the shared top level always).
# "tasks" and "baselines" are the other parts of the dictbench package (the plug-ins).
STAGE_IMPORTS: dict[str, tuple[str, ...]] = {
    "io": (),
    "data": ("io",),
    "score": ("io", "data", "tasks"),
    "train": ("io", "data", "score"),
    "report": ("io", "score"),
}
PLUGINS = ("baselines", "tasks")

# Modules that stay at the top of bench/. "shared": any stage may import them (errors,
# the crash points, resource estimates, progress lines, the registry and the run spec).
# "entry": they run the stages (the CLI, `run` and `eval` orchestration, process
# start-up settings), so no stage imports them.
TOP_LEVEL: dict[str, str] = {
    "errors": "shared",
    "faults": "shared",
    "resources": "shared",
    "console": "shared",
    "registry": "shared",
    "spec": "shared",
    "spec_types": "shared",
    "spec_checks": "shared",
    "cli": "entry",
    "runner": "entry",
    "run_plan": "entry",
    "run_info": "entry",
    "run_resume": "entry",
    "preflight": "entry",
    "evaluate": "entry",
    "eval_groups": "entry",
    "group_scoring": "entry",
    "static_names": "entry",
    "allocator": "entry",
    "wait_policy": "entry",
}

# Folders that stay at the top and are not stages.
TOP_FOLDERS: dict[str, str] = {"commands": "entry", "presets": "data", "assets": "data"}

# The package folders of dictbench and their import names (pyproject's package-dir).
PACKAGE_DIRS: dict[str, str] = {
    "bench": "dictbench",
    "baselines": "dictbench.baselines",
    "tasks": "dictbench.tasks",
}


def moves() -> dict[str, str]:
    """Entry name -> stage, with a check that no name is claimed twice or clashes."""
    out: dict[str, str] = {}
    for stage, (_, names) in STAGES.items():
        for name in names:
            if name in out or name in TOP_LEVEL or name in STAGES:
                raise SystemExit(f"layout.py: '{name}' is placed twice or named like a stage")
            out[name] = stage
    return out
