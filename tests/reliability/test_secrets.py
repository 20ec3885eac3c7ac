"""The judge API key never reaches a file or a log.

A tiny run scores autointerp against a local OpenAI-protocol stub, with one key in
OPENAI_API_KEY and another in the spec. The run is killed after its first record,
resumed from the folder alone (run.json holds no key, so the resumed run must take
the one from the environment), and a second run meets a server that echoes the key
back in a 401 error body. Then every byte the runs wrote (run folder, activation
cache, judge-reply cache, checkpoints) and everything they printed is searched for
either key, and for the key's distinctive middle part on its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from openai_stub_server import StubJudge
from reliability_helpers import KILLED

from dictbench import registry

ENV_KEY = "sk-envkey-5f1c0e9a2b7d4c3e8f6a1b0c"
SPEC_KEY = "sk-speckey-9a8b7c6d5e4f3a2b1c0d9e8f"
SECRETS = [ENV_KEY, SPEC_KEY, "5f1c0e9a2b7d4c3e", "9a8b7c6d5e4f3a2b"]


def _judge(messages) -> str:
    text = messages[-1]["content"]
    return "tokens marked like <<this>>" if "<<" in text else "1, 2"


def _spec(base: Path, tiny_spec_factory, url: str | None) -> Path:
    data = tiny_spec_factory(base / "cache")
    data["checkpoint_every_steps"] = 5
    if url is not None:
        data["tasks"] = ["sparsity", "autointerp"]
        data["eval"]["tokens"] = 2048
        data["task_options"] = {
            "autointerp": {
                "model": "stub-model",
                "base_url": url,
                "api_key": SPEC_KEY,
                "n_latents": 4,
                "backoff": 0.01,
                "window_tokens": 5,
                "n_explain_top": 3,
                "n_explain_quantiles": 1,
                "n_detect_top": 1,
                "n_detect_quantile": 1,
                "n_detect_random": 2,
            }
        }
    base.mkdir(parents=True, exist_ok=True)
    path = base / "spec.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_no_file_or_log_holds_the_api_key(tmp_path, tiny_spec_factory, cli):
    has_autointerp = "autointerp" in registry.task_names()
    env = {"OPENAI_API_KEY": ENV_KEY}
    printed: list[str] = []
    with StubJudge(_judge, script=["429"]) as stub:
        spec = _spec(tmp_path / "a", tiny_spec_factory, stub.url if has_autointerp else None)
        out = tmp_path / "a" / "out"
        logs, envc = tmp_path / "logs", tmp_path / "a" / "env-cache"
        first = cli.run(
            ["run", str(spec), "--out", str(out)],
            logs,
            envc,
            kill_at="record:l1/sparsity",
            extra_env=env,
        )
        resumed = cli.run(["run", "--resume", "--out", str(out)], logs, envc, extra_env=env)
        used = [r["authorization"] for r in stub.log]
    assert first.returncode == KILLED, first.stderr[-2000:]
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    printed += [first.stdout, first.stderr, resumed.stdout, resumed.stderr]
    if has_autointerp:
        # not vacuous: the judge was called, with the key from the environment after resume
        assert used and set(used) == {f"Bearer {ENV_KEY}"}
        assert (out / "results" / "l1" / "autointerp.json").is_file()
        with StubJudge(_judge, script=["auth_echo"] * 20) as stub:
            spec_b = _spec(tmp_path / "b", tiny_spec_factory, stub.url)
            echo = cli.run(
                ["run", str(spec_b), "--out", str(tmp_path / "b" / "out")],
                logs,
                tmp_path / "b" / "env-cache",
                extra_env=env,
            )
            assert stub.log and stub.log[0]["authorization"] == f"Bearer {SPEC_KEY}"
        assert echo.returncode in (0, 2), echo.stderr[-2000:]
        printed += [echo.stdout, echo.stderr]
    else:  # written before the autointerp task existed: the environment key alone
        pytest.skip("no autointerp task registered; only the environment key was checked")

    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "spec.yaml"]
    assert any(p.name == "run.json" for p in written)
    assert any(p.suffix == ".npy" for p in written)  # the activation cache is included
    for p in written:
        data = p.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in data, (p, secret)
    for text in printed:
        for secret in SECRETS:
            assert secret not in text
