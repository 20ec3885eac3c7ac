"""What ``dictbench run --resume`` does with the run folder it continues: checks that
it holds the same spec, removes unfinished writes, and finishes SAEs that were
trained before the interruption by scoring only their missing tasks.

The folder-reading rules themselves (what counts as done) are ``dictbench.train.resume``'s.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dictbench import faults
from dictbench.console import log
from dictbench.io.sae_io import WEIGHTS, load_sae
from dictbench.run_plan import PlannedSAE
from dictbench.score.records import RecordTarget
from dictbench.score.scoring import Scoring, score_sae
from dictbench.spec import RunSpec
from dictbench.train import resume


def previous_run(out: Path, spec: RunSpec) -> dict[str, Any] | None:
    """The interrupted run to continue (checked to have the same spec), or None."""
    previous = resume.read_run_json(out)
    if previous is None:
        log(f"--resume: nothing to resume in {out}; starting the run")
        return None
    resume.check_same_spec(out, previous["spec"], spec.to_dict())
    for partial in resume.remove_partial_writes(out):
        log(f"--resume: removed the unfinished write {partial}")
    log(f"--resume: continuing the run in {out}")
    return previous


def resume_sae(p: PlannedSAE, sc: Scoring) -> bool | None:
    """Finish an SAE that an interrupted run trained: score only the tasks without a
    record. None when it still needs training (possibly from its checkpoint)."""
    out, context, env, timings = sc.out, sc.context, sc.env, sc.timings
    prog = resume.sae_progress(out, p.sae_id, context, [t.name for t in sc.tasks], WEIGHTS)
    for note in prog.notes:
        log(f"--resume: {note}")
    if prog.failed is not None:
        log(f"--resume: {p.sae_id} failed before ({prog.failed}); not retried")
        return False
    if not prog.trained:
        return None
    todo = [t for t in sc.tasks if t.name in prog.missing_tasks]
    if not todo:
        log(f"--resume: {p.sae_id} is complete; skipped")
        return True
    log(f"--resume: {p.sae_id} is trained; scoring {', '.join(t.name for t in todo)}")
    sae, _ = load_sae(out / "saes" / p.sae_id, trust_code=True)  # our run: its spec named it
    sae.to(env.device)
    t = time.perf_counter()
    score_sae(sae, RecordTarget(out, p.sae_id, p.method, context, sc.task_context), todo, env)
    entry = timings["saes"].setdefault(p.sae_id, {})
    entry["eval_s"] = entry.get("eval_s", 0.0) + time.perf_counter() - t
    faults.point(f"sae_done:{p.sae_id}")
    return True
