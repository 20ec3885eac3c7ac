"""The `dictbench` command line, run as a real subprocess on a tiny model and corpus."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_subprocess import run_cli

from dictbench.report.leaderboard import records_frame
from dictbench.score.records import read_records

TASKS = ["sparsity", "reconstruction", "shrinkage", "downstream", "dead_latents"]
# Every metric name METRICS.md defines for these tasks.
METRIC_NAMES = [
    "l0",
    "l1",
    "mse",
    "fvu",
    "explained_variance",
    "cossim",
    "relative_reconstruction_bias",
    "l2_ratio",
    "ce_clean",
    "ce_sae",
    "ce_zero",
    "ce_mean",
    "ce_loss_recovered",
    "ce_loss_recovered_mean_ablation",
    "delta_ce",
    "kl",
    "frac_dead",
    "frac_alive",
    "frac_dense",
]
# Metrics that measure the machine rather than the SAE.
TIMING_METRICS = {"wall_seconds"}


def dictbench(*args: str, cache: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, cache=cache, cwd=cwd)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# --- help and list ----------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["list", "--help"]])
def test_help_exits_zero(args, tmp_path):
    res = dictbench(*args, cache=tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: dictbench")
    assert not (tmp_path / "cache").exists()


def test_run_help_documents_the_options(tmp_path):
    out = dictbench("run", "--help", cache=tmp_path / "cache").stdout
    for option in ("--preset", "--out", "--set", "--baseline", "quickstart"):
        assert option in out


def test_console_script_is_installed(tmp_path):
    exe = shutil.which("dictbench") or str(Path(sys.executable).parent / "dictbench")
    if not Path(exe).exists():
        pytest.skip("the dictbench console script is not on PATH")
    res = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "usage: dictbench" in res.stdout


def test_list_names_baselines_tasks_and_presets(tmp_path):
    res = dictbench("list", cache=tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    lines = {
        line.split(":", 1)[0].strip(): line.split(":", 1)[1] for line in res.stdout.splitlines()
    }
    assert "l1" in [n.strip() for n in lines["baselines"].split(",")]
    tasks = [n.strip() for n in lines["tasks"].split(",")]
    assert set(TASKS) <= set(tasks)
    presets = [n.strip() for n in lines["presets"].split(",")]
    assert {"quickstart", "smoke"} <= set(presets)


# --- the tiny spec end to end -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, tiny_spec_factory):
    """The tiny spec run twice into two out folders, sharing one activation cache."""
    base = tmp_path_factory.mktemp("cli_e2e")
    spec_path = base / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump(tiny_spec_factory(base / "cache"), sort_keys=False))
    runs = []
    for name in ("out1", "out2"):
        res = dictbench("run", str(spec_path), "--out", str(base / name), cache=base / "env_cache")
        runs.append((base / name, res))
    return runs


def _metrics_by_task(out: Path) -> dict[str, dict]:
    return {rec["task"]: rec["metrics"] for rec in read_records(out)}


def test_end_to_end_exit_code_and_output(tiny_runs):
    out, res = tiny_runs[0]
    assert res.returncode == 0, res.stderr[-3000:]
    assert "activation cache: harvested" in res.stdout
    assert "reusing" not in res.stdout
    header = next(line for line in res.stdout.splitlines() if line.startswith("sae_id"))
    for col in ("baseline", "l0", "explained_variance", "ce_loss_recovered", "frac_dead"):
        assert col in header
    assert "\n--------" in res.stdout  # the table's rule
    assert "total wall time" in res.stdout
    assert str(out) in res.stdout


def test_end_to_end_run_json(tiny_runs):
    out, res = tiny_runs[0]
    assert res.returncode == 0, res.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    for key in ("spec", "versions", "git_revision", "machine", "timings", "status"):
        assert key in run
    assert run["status"] == "complete"
    assert run["failed"] == []
    assert run["spec"]["name"] == "tiny" and run["spec"]["out"] == str(out)
    assert run["spec"]["model"]["name"] == "tiny:llama"
    assert "torch" in run["versions"] and "python" in run["versions"]
    assert run["machine"]["device"] == "cpu"
    assert run["timings"]["total_s"] > 0
    assert run["saes"] == ["l1"]


def test_end_to_end_files_and_records(tiny_runs):
    out, res = tiny_runs[0]
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "saes" / "l1" / "sae_weights.safetensors").is_file()
    cfg = json.loads((out / "saes" / "l1" / "cfg.json").read_text())
    assert cfg  # a non-empty config
    found = sorted(p.name for p in (out / "results" / "l1").glob("*.json"))
    assert found == sorted(f"{t}.json" for t in [*TASKS, "training"])
    for rec in read_records(out):
        for key in ("sae_id", "baseline", "task", "metrics", "details", "eval_tokens"):
            assert key in rec, (rec.get("task"), key)
        assert rec["sae_id"] == "l1" and rec["baseline"] == "l1"
        assert isinstance(rec["details"], dict)
        assert isinstance(rec["eval_tokens"], int) and rec["eval_tokens"] > 0
        for name, value in rec["metrics"].items():
            assert value is None or (isinstance(value, (int, float)) and math.isfinite(value)), (
                rec["task"],
                name,
                value,
            )
    # no temporary files left next to the results
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_end_to_end_metric_names(tiny_runs):
    out, res = tiny_runs[0]
    assert res.returncode == 0, res.stderr[-3000:]
    names = set()
    for metrics in _metrics_by_task(out).values():
        names |= set(metrics)
    missing = [m for m in METRIC_NAMES if m not in names]
    assert not missing
    recs = {rec["task"]: rec for rec in read_records(out)}
    dead = recs["dead_latents"]["details"]
    assert dead["window_tokens"] > 0
    hist = dead["log10_density_hist"]
    assert len(hist["counts"]) == len(hist["log10_density_bin_edges"]) - 1
    assert sum(hist["counts"]) + hist["n_dead"] == 64  # d_sae
    # the eval budget in the spec bounds every task's token count
    assert recs["downstream"]["eval_tokens"] <= 256
    assert recs["sparsity"]["eval_tokens"] <= 1024 + 15


def test_end_to_end_records_load_into_pandas(tiny_runs):
    out, res = tiny_runs[0]
    assert res.returncode == 0, res.stderr[-3000:]
    df = records_frame(read_records(out))
    assert len(df) == 1
    assert df.loc[0, "sae_id"] == "l1"
    assert set(METRIC_NAMES) <= set(df.columns)


def test_second_run_reuses_the_cache(tiny_runs):
    (out1, first), (out2, second) = tiny_runs
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing" in second.stdout
    assert "activation cache: harvested" not in second.stdout
    assert (out2 / "run.json").is_file() and out1 != out2
    run = json.loads((out2 / "run.json").read_text())
    assert run["caches"]["train"]["reused"] and run["caches"]["eval"]["reused"]


def test_same_spec_twice_gives_identical_metrics(tiny_runs):
    (out1, first), (out2, second) = tiny_runs
    assert first.returncode == 0 and second.returncode == 0
    a, b = _metrics_by_task(out1), _metrics_by_task(out2)
    assert set(a) == set(b)
    for task in a:
        strip = {k: v for k, v in a[task].items() if k not in TIMING_METRICS}
        assert strip == {k: v for k, v in b[task].items() if k not in TIMING_METRICS}, task


# --- bad input: exit 2, one line on stderr naming the field, nothing written ------------

BAD_RUNS = [
    # (extra spec fields, CLI args after the spec, text the error line must contain)
    ({"colour": "blue"}, [], "colour"),
    ({}, ["--set", "budget.d_sae=0"], "budget.d_sae"),
    ({}, ["--preset", "nosuch"], "preset"),
    ({}, ["--baseline", "nosuch"], "nosuch"),
    ({}, ["--set", "hook=resid_post.99"], "hook"),
    ({}, ["--baseline", "os:path"], "os:path"),
    # a corpus problem is found before anything is written as well
    ({}, ["--set", "eval.tokens=10000000"], "corpus too short"),
]


@pytest.mark.parametrize(
    "extra,args,named",
    BAD_RUNS,
    ids=[
        "unknown-field",
        "d_sae-0",
        "preset",
        "baseline",
        "hook",
        "not-a-class",
        "corpus-too-short",
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, tiny_spec_factory, extra, args, named):
    spec_path = tmp_path / "bad.yaml"
    spec_path.write_text(yaml.safe_dump({**tiny_spec_factory(tmp_path / "cache"), **extra}))
    out = tmp_path / "out"
    res = dictbench("run", str(spec_path), *args, "--out", str(out), cache=tmp_path / "env")
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = _error_lines(res.stderr)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("dictbench: error: ")
    assert named in lines[0]
    assert "Traceback" not in res.stderr
    assert not out.exists()
    assert not (tmp_path / "cache").exists()


def test_missing_spec_file(tmp_path):
    res = dictbench("run", str(tmp_path / "absent.yaml"), cache=tmp_path / "env")
    assert res.returncode == 2
    lines = _error_lines(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("dictbench: error: ")
    assert "absent.yaml" in lines[0]


def test_unwritable_out(tmp_path, tiny_spec_file):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    res = dictbench("run", str(tiny_spec_file), "--out", str(out), cache=tmp_path / "env")
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = _error_lines(res.stderr)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("dictbench: error: --out")
    assert str(out) in lines[0]
    assert blocker.read_text() == "not a folder"
