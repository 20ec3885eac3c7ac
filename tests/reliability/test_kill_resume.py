"""SIGKILL a real `dictbench run` at five points, resume it each time, and get exactly the
results of a run that was never interrupted.

One run folder goes through a chain of attempts, each killed (by the test-only crash
point DICTBENCH_TEST_KILL_AT, see bench/faults.py) somewhere else: mid-harvest,
mid-training, between SAEs, inside an atomic write, and between task records. The
last attempt finishes. Weights must be byte-identical and every metric equal to an
uninterrupted run of the same spec; work finished before a kill must not be redone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from reliability_helpers import KILLED, configs_of, results_of, snapshot, weights_of

from dictbench.train.checkpoint import read as read_checkpoint

STEPS = 16  # budget.train_tokens 4096 / batch_size 256
EVERY = 5  # checkpoint_every_steps
TASKS = ["sparsity", "reconstruction", "shrinkage", "downstream", "dead_latents"]
# (crash point, resume?) for each attempt; the last attempt has no crash point.
CHAIN = [
    ("harvest:train:batch=1", False),  # a half-written activation cache
    ("train:l1:step=7", True),  # mid-training, two steps after the checkpoint at 5
    ("sae_done:l1", True),  # between SAEs
    ("write:results/topk/training.json", True),  # inside an atomic write
    ("record:topk/reconstruction", True),  # between task records of one SAE
    (None, True),
]


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory, tiny_spec_factory) -> Path:
    base = tmp_path_factory.mktemp("kill_resume")
    data = tiny_spec_factory(base / "unused")
    data.pop("cache_dir")  # each run below names its own
    data["baselines"] = [
        {"method": "l1", "params": {"l1_coefficient": 1.0}},
        {"method": "topk", "params": {"k": 8}},  # state in buffers (dead-latent counters)
    ]
    data["checkpoint_every_steps"] = EVERY
    path = base / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def reference(cli, spec_path) -> Path:
    base = spec_path.parent
    out = base / "reference"
    res = cli.run(
        ["run", str(spec_path), "--out", str(out), "--set", f"cache_dir={base / 'ref-cache'}"],
        base / "logs-ref",
        base / "env-cache",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def chain(cli, spec_path) -> tuple[Path, Path, list[dict]]:
    """Every attempt's result plus the run folder and cache as it left them."""
    base = spec_path.parent
    out, cache = base / "interrupted", base / "chain-cache"
    attempts = []
    for i, (kill_at, resume) in enumerate(CHAIN):
        if i == len(CHAIN) - 1:
            argv = ["run", "--resume", "--out", str(out)]  # the spec recorded in run.json
        else:
            argv = ["run", str(spec_path), "--out", str(out), "--set", f"cache_dir={cache}"]
            argv += ["--resume"] if resume else []
        res = cli.run(argv, base / "logs-chain", base / "env-cache", kill_at=kill_at)
        attempts.append(
            {
                "kill_at": kill_at,
                "result": res,
                "files": snapshot(out) if out.exists() else {},
                "cache": sorted(p.name for p in cache.iterdir()) if cache.exists() else [],
            }
        )
    return out, cache, attempts


def _lines(attempt: dict) -> list[str]:
    return attempt["result"].stdout.splitlines()


def test_every_attempt_died_where_asked_and_the_last_finished(chain):
    _, _, attempts = chain
    codes = [a["result"].returncode for a in attempts]
    errors = [a["result"].stderr[-2000:] for a in attempts]
    assert codes == [KILLED] * (len(CHAIN) - 1) + [0], errors


def test_a_half_written_activation_cache_is_never_used(chain):
    _, _, attempts = chain
    first, second = attempts[0], attempts[1]
    # killed mid-harvest: only a temporary folder, no entry that could be mistaken for one
    # (and the entry's lock file, which the kernel unlocked when the process died)
    left = [name for name in first["cache"] if not name.endswith(".lock")]
    assert len(left) == 1 and left[0].startswith(".tmp-train-")
    assert [name for name in first["cache"] if name.endswith(".lock")] in (
        [],
        [".train-" + left[0].split("-")[2] + ".lock"],
    )
    assert json.loads(first["files"]["run.json"])["status"] == "running"
    out = second["result"].stdout
    assert "reusing" not in out
    assert "left by a harvest that was interrupted" in out
    assert "activation cache: harvested train" in out and "activation cache: harvested eval" in out
    assert not [name for name in second["cache"] if name.startswith(".")]


def test_training_resumes_from_the_last_checkpoint(chain):
    _, _, attempts = chain
    killed = attempts[1]
    ckpt = sorted(k for k in killed["files"] if k.startswith("checkpoints/"))
    # l1 and topk train in lockstep (bench/train/lockstep.py): both checkpoint at step 5
    assert ckpt == ["checkpoints/l1.safetensors", "checkpoints/topk.safetensors"]
    assert "results/l1/training.json" not in killed["files"]
    # killed before step 7; the last checkpoint was written after step 4 (every 5 steps)
    assert "l1: resuming training at step 5 of 16" in attempts[2]["result"].stdout
    assert "topk: resuming training at step 5 of 16" in attempts[2]["result"].stdout


def test_checkpoint_left_by_the_kill_holds_step_5(tmp_path, chain):
    _, _, attempts = chain
    path = tmp_path / "l1.safetensors"
    path.write_bytes(attempts[1]["files"]["checkpoints/l1.safetensors"])
    _, meta = read_checkpoint(path)
    assert meta["step"] == (7 // EVERY) * EVERY == 5
    assert meta["total_steps"] == STEPS


def test_a_finished_sae_is_not_redone(chain):
    out, _, attempts = chain
    l1_after = {k: v for k, v in attempts[2]["files"].items() if "/l1/" in f"/{k}"}
    assert {f"results/l1/{t}.json" for t in [*TASKS, "training"]} <= set(l1_after)
    for later in attempts[3:]:
        assert "--resume: l1 is complete; skipped" in later["result"].stdout
        assert "l1: resuming" not in later["result"].stdout
    final = snapshot(out)
    # byte for byte, creation timestamps included: nothing of l1 was written again
    assert {k: final[k] for k in l1_after} == l1_after


def test_an_interrupted_atomic_write_leaves_the_old_state(chain):
    _, _, attempts = chain
    files = attempts[3]["files"]
    partial = [k for k in files if k.startswith("results/topk/.training.json.")]
    assert len(partial) == 1 and partial[0].endswith(".tmp")
    assert "results/topk/training.json" not in files
    assert "checkpoints/topk.safetensors" in files  # the final-step checkpoint
    out = attempts[4]["result"].stdout
    assert "--resume: removed the unfinished write" in out
    assert "topk: resuming training at step 16 of 16" in out


def test_finished_task_records_are_kept_and_only_the_rest_scored(chain):
    out, _, attempts = chain
    before = {k: v for k, v in attempts[4]["files"].items() if k.startswith("results/topk/")}
    assert sorted(before) == [
        "results/topk/reconstruction.json",
        "results/topk/sparsity.json",
        "results/topk/training.json",
    ]
    last = attempts[5]["result"].stdout
    assert "--resume: topk is trained; scoring shrinkage, downstream, dead_latents" in last
    final = snapshot(out)
    assert {k: final[k] for k in before} == before


def test_resumed_run_equals_an_uninterrupted_one(chain, reference):
    out, _, _ = chain
    assert weights_of(out) == weights_of(reference)  # byte for byte
    assert sorted(weights_of(out)) == ["l1", "topk"]
    assert configs_of(out) == configs_of(reference)
    got, want = results_of(out), results_of(reference)
    assert sorted(got) == sorted(f"{s}/{t}" for s in ("l1", "topk") for t in [*TASKS, "training"])
    for key in want:
        assert got[key] == want[key], key


def test_run_json_and_folders_are_clean_after_the_last_attempt(chain):
    out, cache, attempts = chain
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["failed"] == []
    assert run["resumed"] == len(CHAIN) - 1
    assert run["saes"] == ["l1", "topk"]
    assert not list((out / "checkpoints").iterdir())  # finished SAEs drop their checkpoints
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # lock and partials gone
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["eval", "train"]
    assert "total wall time" in attempts[-1]["result"].stdout


def test_the_console_script_killed_and_resumed(tmp_path, spec_path, reference, cli):
    """The kill through `python -m dictbench.cli` itself, a fresh interpreter; the resume
    (already shown above to work) goes through the fork server to save ~5 s of imports."""
    out = tmp_path / "out"
    cache = spec_path.parent / "ref-cache"  # complete: this test is about training
    env = {
        **os.environ,
        "DICTBENCH_CACHE": str(tmp_path / "env"),
        "DICTBENCH_TEST_KILL_AT": "train:topk:step=12",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",  # as in the reference run, so float sums agree bit for bit
    }
    argv = ["run", str(spec_path), "--out", str(out), "--set", f"cache_dir={cache}"]
    killed = subprocess.run(
        [sys.executable, "-m", "dictbench.cli", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == KILLED, killed.stderr[-2000:]
    assert (out / "checkpoints" / "topk.safetensors").is_file()
    resumed = cli.run([*argv, "--resume"], tmp_path / "logs", tmp_path / "env")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    # killed in the lockstep group's step 12: both SAEs resume from their step-10 state
    assert "l1: resuming training at step 10 of 16" in resumed.stdout
    assert "topk: resuming training at step 10 of 16" in resumed.stdout
    assert weights_of(out) == weights_of(reference)
    assert results_of(out) == results_of(reference)
