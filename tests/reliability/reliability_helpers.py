"""Running `dictbench` in child processes that can be SIGKILLed, and comparing run folders.

Each run is ``dictbench.cli.main(argv)`` in its own OS process, forked from a fork
server (cli_forkserver.py) that has already imported torch, transformers and
dictbench: a real `dictbench run` (the console script's entry point, its own memory,
killed by the kernel with SIGKILL) without paying ~5 s of imports per process here.
The crash point comes from ``DICTBENCH_TEST_KILL_AT`` (see bench/faults.py).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KILLED = -signal.SIGKILL
TIMING_KEYS = {"wall_seconds", "created"}
SERVER = Path(__file__).with_name("cli_forkserver.py")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class CliRunner:
    """Runs ``dictbench <argv>`` in fresh child processes of one fork server."""

    def __init__(self) -> None:
        # read at import time; and no test may reach the Hugging Face hub
        env = {
            **os.environ,
            "TQDM_DISABLE": "1",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
        }
        self.proc = subprocess.Popen(
            [sys.executable, str(SERVER)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # so a timeout can kill the server and its child
        )
        self._reply(600)

    def _reply(self, timeout: float) -> dict[str, Any]:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close(kill=True)
            raise TimeoutError(f"the dictbench fork server gave no answer in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the dictbench fork server exited")
        return json.loads(line)

    def run(
        self,
        argv: list[str],
        logs: Path,
        cache: Path,
        kill_at: str | None = None,
        extra_env: dict[str, str] | None = None,
        timeout: float = 300,
    ) -> Result:
        """``dictbench <argv>``; returncode is ``KILLED`` after the requested SIGKILL."""
        logs.mkdir(parents=True, exist_ok=True)
        n = len(list(logs.glob("*.out")))
        out, err = logs / f"{n:02d}.out", logs / f"{n:02d}.err"
        env = {k: v for k, v in os.environ.items() if k != "DICTBENCH_TEST_KILL_AT"}
        env.update({"DICTBENCH_CACHE": str(cache), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})
        if kill_at:
            env["DICTBENCH_TEST_KILL_AT"] = kill_at
        env.update(extra_env or {})
        req = {"argv": argv, "env": env, "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        code = self._reply(timeout)["returncode"]
        return Result(code, out.read_text(), err.read_text())

    def close(self, kill: bool = False) -> None:
        if kill:
            os.killpg(self.proc.pid, signal.SIGKILL)
        else:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


# --- comparing run folders ---------------------------------------------------------------


def strip_timing(obj: Any) -> Any:
    """A record or config without the fields that measure the machine, not the SAE."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def results_of(run: Path) -> dict[str, Any]:
    """``"<sae_id>/<task>" -> record`` without timing fields."""
    return {
        f"{p.parent.name}/{p.stem}": strip_timing(json.loads(p.read_text()))
        for p in sorted((run / "results").glob("*/*.json"))
    }


def weights_of(run: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted((run / "saes").glob("*/*.safetensors"))}


def configs_of(run: Path) -> dict[str, Any]:
    return {
        p.parent.name: strip_timing(json.loads(p.read_text()))
        for p in sorted((run / "saes").glob("*/cfg.json"))
    }


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
