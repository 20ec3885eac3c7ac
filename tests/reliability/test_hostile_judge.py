"""A dead or dying judge: the circuit breaker stops requests after N connection failures
in a row, says so once, and fails the remaining latents with the reason; a server that
answers (429, 5xx) keeps the ordinary backoff."""

from __future__ import annotations

import asyncio
import socket

import pytest
from openai_stub_server import StubJudge

from dictbench.score.judge import Judge, JudgeSettings

MSG = [{"role": "user", "content": "explain"}]


def closed_port_url() -> str:
    """A localhost URL nothing listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def settings(url: str, cache, **kw) -> JudgeSettings:
    base = dict(
        model="m",
        base_url=url,
        api_key="k",
        concurrency=2,
        timeout_s=2.0,
        max_retries=5,
        backoff_s=0.001,
        backoff_max_s=0.002,
        cache_dir=cache,
    )
    return JudgeSettings(**{**base, **kw})


def many_calls(s: JudgeSettings, n: int):
    async def go():
        async with Judge(s) as judge:
            replies = await asyncio.gather(
                *(judge.chat([{"role": "user", "content": f"latent {i}"}]) for i in range(n))
            )
            return replies, judge.stats

    return asyncio.run(go())


def test_closed_port_stops_after_breaker_limit_not_full_retry_schedule(tmp_path, capsys):
    # Before the breaker: 5 latents x 6 attempts = 30 requests. Now: 5, whatever n.
    s = settings(closed_port_url(), tmp_path, breaker_after=5, concurrency=1)
    replies, stats = many_calls(s, 40)
    assert stats.requests == 5
    assert stats.breaker_open
    assert all(not r.ok for r in replies)
    assert all("judge unreachable" in r.error for r in replies[-30:])
    err = capsys.readouterr().err
    assert err.count("judge unreachable") == 1, err  # said once, not once per latent


def test_with_concurrency_at_most_the_requests_already_in_flight_follow(tmp_path):
    s = settings(closed_port_url(), tmp_path, breaker_after=5, concurrency=4)
    _, stats = many_calls(s, 40)
    assert 5 <= stats.requests <= 5 + 4 - 1


def test_breaker_limit_is_a_setting(tmp_path):
    s = settings(closed_port_url(), tmp_path, breaker_after=2, concurrency=1)
    _, stats = many_calls(s, 10)
    assert stats.requests == 2


def test_breaker_zero_keeps_full_retries(tmp_path):
    _, stats = many_calls(settings(closed_port_url(), tmp_path, breaker_after=0, max_retries=2), 2)
    assert stats.requests == 2 * 3 and not stats.breaker_open


def test_5xx_and_429_do_not_open_the_breaker(tmp_path):
    script = ["500", "503", "429", "500", "503", "429"]
    with StubJudge(lambda m: "fine", script=script) as stub:
        s = settings(stub.url, tmp_path, breaker_after=2, max_retries=6, concurrency=1)
        (reply,), stats = many_calls(s, 1)
    assert reply.ok and reply.content == "fine"
    assert stats.requests == 7 and not stats.breaker_open


def test_a_server_answer_resets_the_count(tmp_path):
    """Timeouts (no answer) count; a success in between resets, so 2+2 < 3 never trips."""
    script = ["slow", "slow", "ok", "slow", "slow"]
    with StubJudge(lambda m: "fine", script=script, slow_s=1.0) as stub:
        s = settings(stub.url, tmp_path, breaker_after=3, timeout_s=0.2, concurrency=1)

        async def go():
            async with Judge(s) as judge:
                a = await judge.chat([{"role": "user", "content": "one"}])
                b = await judge.chat([{"role": "user", "content": "two"}])
                return a, b, judge.stats

        a, b, stats = asyncio.run(go())
    assert a.ok and b.ok and not stats.breaker_open
    assert stats.requests == 6  # 2 timeouts + ok, 2 timeouts + ok


def test_autointerp_counts_unreached_latents_as_failed_with_reason(tmp_path):
    test_autointerp = pytest.importorskip("test_autointerp")
    opts = {
        "model": "m",
        "base_url": closed_port_url(),
        "api_key": "k",
        "backoff": 0.001,
        "timeout": 2,
        "retries": 5,
        "breaker_after": 3,
        "concurrency": 1,
        "cache_dir": str(tmp_path),
        "n_latents": 7,
    }
    env = test_autointerp.synthetic_env(opts)
    res = test_autointerp.run_task(env)
    m = res.metrics
    n = m["detection_n_scored"] + m["detection_n_failed"]
    assert m["detection_n_scored"] == 0 and m["detection_n_failed"] == n > 0
    assert res.details["judge"]["requests"] == 3
    assert all("judge unreachable" in (lat.get("error") or "") for lat in res.details["latents"])


def test_breaker_after_must_not_be_negative():
    from dictbench.errors import SpecError
    from dictbench.tasks.autointerp_config import parse_options

    with pytest.raises(SpecError, match="breaker_after"):
        parse_options({"model": "m", "breaker_after": -1})
