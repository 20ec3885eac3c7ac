"""SIGKILL a streamed lockstep `dictbench run` (budget.source: stream, a shuffle buffer of
a few windows, so the stream runs over many blocks) at four points, resume each time, and
get exactly the weights and metrics of a streamed run that was never interrupted; and
show that such a run writes no training cache at all.

The crash points (bench/faults.py): inside the model's forward of a block, mid-training
of each SAE of the group, and between the task records of the first SAE.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from reliability_helpers import KILLED, results_of, weights_of

pytestmark = pytest.mark.slow  # minutes of multi-process runs: `make test-long`

CHAIN = [
    ("stream:window=48", False),  # the model mid-forward, before step 0's batch is whole
    ("train:l1:step=7", True),  # mid-training; both SAEs have checkpoints at step 5
    ("train:topk:step=13", True),  # the group's second SAE, after l1's step 13
    ("record:l1/sparsity", True),  # scoring l1; topk trained, not yet saved
    (None, True),
]


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory, tiny_spec_factory) -> Path:
    base = tmp_path_factory.mktemp("kill_resume_stream")
    data = tiny_spec_factory(base / "unused")
    data.pop("cache_dir")
    data["budget"].update(source="stream", buffer_tokens=16 * 15)  # 16 windows a block
    data["baselines"] = [
        {"method": "l1", "params": {"l1_coefficient": 1.0}},
        {"method": "topk", "params": {"k": 8}},
    ]
    data["checkpoint_every_steps"] = 5
    path = base / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _run(cli, spec_path: Path, out: Path, cache: Path, kill_at=None, resume=False):
    argv = ["run", str(spec_path), "--out", str(out), "--set", f"cache_dir={cache}"]
    argv += ["--resume"] if resume else []
    base = spec_path.parent
    return cli.run(argv, base / f"logs-{out.name}", base / "env-cache", kill_at=kill_at)


@pytest.fixture(scope="module")
def reference(cli, spec_path) -> Path:
    out, cache = spec_path.parent / "reference", spec_path.parent / "ref-cache"
    res = _run(cli, spec_path, out, cache)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "streamed from the model" in res.stdout
    return out


def test_a_streamed_run_writes_no_training_cache(reference, spec_path):
    cache = spec_path.parent / "ref-cache"
    assert sorted(p.name.split("-")[0] for p in cache.iterdir() if p.is_dir()) == ["eval"]


def test_killed_anywhere_and_resumed_it_equals_the_uninterrupted_run(cli, spec_path, reference):
    out, cache = spec_path.parent / "interrupted", spec_path.parent / "chain-cache"
    outputs = []
    for kill_at, resume in CHAIN:
        res = _run(cli, spec_path, out, cache, kill_at, resume)
        outputs.append(res.stdout)
        want = KILLED if kill_at else 0
        assert res.returncode == want, (kill_at, res.stderr[-2000:])
    assert "l1: resuming training at step 5 of 16" in outputs[2]
    assert "topk: resuming training at step 5 of 16" in outputs[2]
    assert "l1: resuming training at step 10 of 16" in outputs[3]
    assert "topk: resuming training at step 10 of 16" in outputs[3]
    assert "topk: resuming training at step 16 of 16" in outputs[4]
    assert weights_of(out) == weights_of(reference)  # byte for byte
    got, want = results_of(out), results_of(reference)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key] == want[key], key
