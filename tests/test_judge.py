"""The judge client against a real HTTP server: retries, timeouts, cache, concurrency,
failures and key redaction, through the real ``openai`` client."""

from __future__ import annotations

import asyncio
import json

import pytest
from openai_stub_server import StubJudge

from dictbench.score.judge import Judge, JudgeSettings, ReplyCache, public_url, redact

KEY = "sk-test-0123456789abcdef-SECRET"
MSG = [{"role": "user", "content": "say something"}]


def settings(stub: StubJudge, cache, **kw) -> JudgeSettings:
    base = dict(
        model="stub-model",
        base_url=stub.url,
        api_key=KEY,
        concurrency=4,
        timeout_s=5.0,
        max_retries=3,
        backoff_s=0.01,
        backoff_max_s=0.05,
        cache_dir=cache,
    )
    base.update(kw)
    return JudgeSettings(**base)


def calls(s: JudgeSettings, requests: list[tuple[list, dict]]):
    """Run the given chat calls concurrently in one Judge; return (replies, stats)."""

    async def go():
        async with Judge(s) as judge:
            replies = await asyncio.gather(*(judge.chat(m, **p) for m, p in requests))
            return replies, judge.stats

    return asyncio.run(go())


def test_retries_429_5xx_and_timeouts_then_succeeds(tmp_path):
    with StubJudge(lambda m: "fine", script=["429", "500", "503", "slow"], slow_s=1.5) as stub:
        s = settings(stub, tmp_path, timeout_s=0.3, max_retries=4)
        (reply,), stats = calls(s, [(MSG, {"temperature": 0})])
    assert reply.ok and reply.content == "fine" and not reply.cached
    assert [r["fault"] for r in stub.log] == ["429", "500", "503", "slow", "ok"]
    assert (stats.requests, stats.retries, stats.failed_calls) == (5, 4, 0)
    # usage comes from the one reply that completed: 2 prompt words, 1 completion word
    assert (stats.prompt_tokens, stats.completion_tokens) == (2, 1)


def test_retries_are_bounded_and_a_failure_is_not_cached(tmp_path):
    with StubJudge(lambda m: "fine", script=["429"] * 3) as stub:
        s = settings(stub, tmp_path, max_retries=2)
        (reply,), stats = calls(s, [(MSG, {})])
        assert not reply.ok and "after 3 attempts" in reply.error and "429" in reply.error
        assert (stats.requests, stats.retries, stats.failed_calls) == (3, 2, 1)
        (again,), stats2 = calls(s, [(MSG, {})])  # the script is spent: this one succeeds
    assert again.ok and not again.cached and stats2.requests == 1


@pytest.mark.parametrize(
    "fault, text", [("garbage", "malformed reply"), ("no_choices", "no choices")]
)
def test_malformed_reply_fails_without_retry(tmp_path, fault, text):
    with StubJudge(lambda m: "fine", script=[fault]) as stub:
        (reply,), stats = calls(settings(stub, tmp_path), [(MSG, {})])
    assert not reply.ok and text in reply.error
    assert stats.requests == 1 and stats.retries == 0 and stats.failed_calls == 1
    assert not list(tmp_path.rglob("*.json"))  # nothing cached


def test_key_echoed_by_server_is_redacted_and_refusal_stops_requests(tmp_path):
    with StubJudge(lambda m: "fine", script=["auth_echo"]) as stub:
        replies, stats = calls(
            settings(stub, tmp_path, concurrency=1),
            [([{"role": "user", "content": f"q{i}"}], {}) for i in range(3)],
        )
    assert stub.log[0]["authorization"] == f"Bearer {KEY}"  # the key really was sent
    assert all(not r.ok for r in replies)
    for r in replies:
        assert KEY not in r.error and "HTTP 401" in r.error
    assert "<redacted>" in replies[0].error
    assert stats.requests == 1  # 401 is not retried, and later calls do not even try


def test_cache_hit_on_rerun_and_key_sensitivity(tmp_path):
    with StubJudge(lambda m: "reply to " + m[-1]["content"]) as stub:
        s = settings(stub, tmp_path)
        reqs = [(MSG, {"temperature": 0.0, "max_tokens": 5})]
        (first,), st1 = calls(s, reqs)
        (second,), st2 = calls(s, reqs)
        assert first.content == second.content == "reply to say something"
        assert (st1.requests, st1.cache_hits) == (1, 0)
        assert (st2.requests, st2.cache_hits) == (0, 1) and second.cached
        # the endpoint is not part of the key; model, messages and parameters are
        moved = settings(stub, tmp_path, base_url=stub.url.replace("127.0.0.1", "localhost"))
        assert calls(moved, reqs)[1].requests == 0
        variants = [
            (settings(stub, tmp_path, model="other"), reqs),
            (s, [(MSG, {"temperature": 0.5, "max_tokens": 5})]),
            (s, [([{"role": "user", "content": "say something else"}], reqs[0][1])]),
        ]
        for v_settings, v_reqs in variants:
            assert calls(v_settings, v_reqs)[1].requests == 1
    files = sorted(tmp_path.rglob("*.json"))
    assert len(files) == 4
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    entry = json.loads(files[0].read_text())
    assert set(entry) == {"request", "content", "usage"}
    assert KEY not in "".join(p.read_text() for p in files)


def test_corrupt_cache_entry_is_a_miss_and_is_rewritten(tmp_path):
    ident = ReplyCache.request_identity("stub-model", MSG, {})
    path = tmp_path / (key := ReplyCache.key(ident))[:2] / f"{key}.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"request": "truncated')
    with StubJudge(lambda m: "fresh") as stub:
        (reply,), stats = calls(settings(stub, tmp_path), [(MSG, {})])
    assert reply.content == "fresh" and stats.requests == 1
    assert json.loads(path.read_text())["content"] == "fresh"


def test_concurrency_is_bounded_and_used(tmp_path):
    with StubJudge(lambda m: "ok", latency_s=0.25) as stub:
        reqs = [([{"role": "user", "content": f"q{i}"}], {}) for i in range(9)]
        replies, stats = calls(settings(stub, tmp_path, concurrency=3), reqs)
    assert all(r.ok for r in replies) and stats.requests == 9
    assert 2 <= stub.max_in_flight <= 3


def test_identical_requests_in_flight_share_one_exchange(tmp_path):
    with StubJudge(lambda m: "shared", latency_s=0.1) as stub:
        replies, stats = calls(settings(stub, tmp_path), [(MSG, {})] * 3)
    assert [r.content for r in replies] == ["shared"] * 3
    assert stats.requests == 1 and stats.cache_hits == 2


def test_backoff_delay_policy(tmp_path):
    j = Judge(JudgeSettings(model="m", backoff_s=1.0, backoff_max_s=10.0))
    assert j._delay(0, {"retry-after": "2"}) == 2.0
    assert j._delay(0, {"retry-after": "99"}) == 10.0  # capped
    for attempt, base in [(0, 1.0), (2, 4.0), (3, 8.0), (6, 10.0)]:
        for _ in range(20):
            assert 0.5 * base <= j._delay(attempt, {}) <= base


def test_redaction_helpers():
    assert redact(f"Bearer {KEY} and again {KEY}", KEY).count("<redacted>") == 2
    assert redact("nothing here", None) == "nothing here"
    assert public_url("http://user:pw@host:8080/v1") == "http://host:8080/v1"
    assert public_url("http://127.0.0.1:1/v1") == "http://127.0.0.1:1/v1"
    s = JudgeSettings(model="m", api_key=KEY)
    assert KEY not in repr(s) and KEY not in json.dumps(s.public())
