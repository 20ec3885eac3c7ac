"""An LLM judge behind any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp, ...).

Why a wrapper around the ``openai`` client rather than the client alone:
- the SDK's own retries are switched off, so every HTTP attempt is counted and the
  backoff policy (429, 5xx, timeouts; ``Retry-After`` honoured) is ours and testable;
- every reply is cached on disk by (model, messages, sampling parameters), so a rerun
  sends nothing and reproduces a score exactly, and an interrupted run loses no work;
- a call never raises for a judge problem: it returns a ``Reply`` with ``error`` set,
  so one bad reply fails one latent, not the run;
- the API key is kept out of every string we produce (errors included: a server may
  echo the Authorization header back in its error body).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dictbench.io import atomic

CACHE_FORMAT = 1
RETRY_STATUSES = {408, 409, 429}
# Errors that will not go away by retrying and would fail every later request too.
FATAL_STATUSES = {401, 403, 404}
# Local servers (llama.cpp, vLLM without --api-key) ignore the key, but the SDK wants one.
PLACEHOLDER_KEY = "not-needed"


def redact(text: str, secret: str | None) -> str:
    if secret and len(secret) >= 4:
        text = text.replace(secret, "<redacted>")
    return text


def public_url(url: str | None) -> str | None:
    """The URL without any user:password part, fit to be written into results."""
    if not url:
        return url
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = host + (f":{parts.port}" if parts.port else "")
        parts = parts._replace(netloc=netloc)
    return urlunsplit(parts)


@dataclass
class JudgeSettings:
    model: str
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 30.0
    cache_dir: Path | None = None
    # Circuit breaker: after this many connection failures in a row (nothing answered at
    # all, not even an error status), the judge is taken as down and no more requests are
    # sent; the remaining calls fail at once with the reason. 0 switches it off.
    breaker_after: int = 5

    def public(self) -> dict[str, Any]:
        """Everything but the key, for result records."""
        return {
            "model": self.model,
            "base_url": public_url(self.base_url) or "https://api.openai.com/v1",
            "concurrency": self.concurrency,
            "timeout_s": self.timeout_s,
            "max_retries": self.max_retries,
            "breaker_after": self.breaker_after,
            "cache_dir": str(self.cache_dir) if self.cache_dir else None,
        }


@dataclass
class JudgeStats:
    requests: int = 0  # HTTP attempts actually sent, retries included
    retries: int = 0
    cache_hits: int = 0
    failed_calls: int = 0  # calls that ended without a usable reply
    breaker_open: bool = False  # the judge was found unreachable and requests stopped
    prompt_tokens: int = 0  # as reported by the server, for requests sent in this run
    completion_tokens: int = 0


@dataclass
class Reply:
    content: str | None
    error: str | None = None
    cached: bool = False
    usage: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.content is not None


class ReplyCache:
    """One JSON file per reply, named by a hash of the request; written atomically."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    @staticmethod
    def request_identity(model: str, messages: list[dict], params: dict) -> dict[str, Any]:
        return {"format": CACHE_FORMAT, "model": model, "messages": messages, "params": params}

    @staticmethod
    def key(identity: dict[str, Any]) -> str:
        blob = json.dumps(identity, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str, identity: dict[str, Any]) -> str | None:
        if self.root is None:
            return None
        try:
            entry = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None
        if entry.get("request") != identity or not isinstance(entry.get("content"), str):
            return None  # a hash collision or a foreign file: treat as a miss
        return entry["content"]

    def put(self, key: str, identity: dict[str, Any], content: str, usage: dict) -> None:
        if self.root is not None:
            atomic.write_json(
                self._path(key), {"request": identity, "content": content, "usage": usage}
            )


class Judge:
    """``async with Judge(settings) as judge: reply = await judge.chat(messages, ...)``"""

    def __init__(self, settings: JudgeSettings) -> None:
        self.settings = settings
        self.stats = JudgeStats()
        self.cache = ReplyCache(settings.cache_dir)
        self._client: Any = None
        self._sem: asyncio.Semaphore | None = None
        self._inflight: dict[str, asyncio.Future] = {}
        self._fatal: str | None = None
        self._conn_failures = 0  # consecutive attempts that reached no server
        self._jitter = random.Random()

    async def __aenter__(self) -> Judge:
        import openai

        s = self.settings
        self._client = openai.AsyncOpenAI(
            api_key=s.api_key or PLACEHOLDER_KEY,
            base_url=s.base_url,
            timeout=s.timeout_s,
            max_retries=0,
        )
        self._sem = asyncio.Semaphore(max(1, s.concurrency))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def chat(self, messages: list[dict[str, str]], **params: Any) -> Reply:
        """The judge's reply text, from the cache when this exact request was made before.
        Identical requests in flight at the same time share one HTTP exchange."""
        identity = ReplyCache.request_identity(self.settings.model, messages, params)
        key = ReplyCache.key(identity)
        cached = self.cache.get(key, identity)
        if cached is not None:
            self.stats.cache_hits += 1
            return Reply(cached, cached=True)
        if key in self._inflight:
            self.stats.cache_hits += 1
            return await asyncio.shield(self._inflight[key])
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            reply = await self._request(messages, params)
            if reply.ok:
                assert reply.content is not None
                self.cache.put(key, identity, reply.content, reply.usage)
            else:
                self.stats.failed_calls += 1
            fut.set_result(reply)
            return reply
        finally:
            if not fut.done():
                fut.set_result(Reply(None, "cancelled"))
            del self._inflight[key]

    async def _request(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Reply:
        import openai

        assert self._sem is not None and self._client is not None
        s = self.settings
        attempt = 0
        while True:
            async with self._sem:
                if self._fatal is not None:
                    return Reply(None, self._fatal)
                self.stats.requests += 1
                try:
                    resp = await self._client.chat.completions.create(
                        model=s.model, messages=messages, **params
                    )
                    self._conn_failures = 0
                    return self._read(resp)
                except openai.APIStatusError as e:
                    self._conn_failures = 0  # a server answered: not a dead judge
                    error = self._describe(e)
                    status = e.status_code
                    retryable = status in RETRY_STATUSES or status >= 500
                    if status in FATAL_STATUSES:
                        self._fatal = f"judge refused the request, not retrying: {error}"
                        return Reply(None, self._fatal)
                    headers = e.response.headers
                except (openai.APITimeoutError, openai.APIConnectionError) as e:
                    error, retryable, headers = self._describe(e), True, None
                    if self._count_connection_failure(error):
                        return Reply(None, self._fatal)
                except Exception as e:  # a reply the SDK could not parse: not retried
                    return Reply(None, f"malformed reply: {self._describe(e)}")
            if not retryable or attempt >= s.max_retries:
                suffix = f" after {attempt + 1} attempts" if retryable else ""
                return Reply(None, error + suffix)
            await asyncio.sleep(self._delay(attempt, headers))
            if self._fatal is not None:  # the breaker opened while this call slept
                return Reply(None, self._fatal)
            attempt += 1
            self.stats.retries += 1

    def _count_connection_failure(self, error: str) -> bool:
        """Count one unanswered attempt; open the breaker (and say so, once) at the limit."""
        self._conn_failures += 1
        limit = self.settings.breaker_after
        if self._fatal is not None or limit <= 0 or self._conn_failures < limit:
            return self._fatal is not None
        self._fatal = (
            f"judge unreachable: {self._conn_failures} connection failures in a row "
            f"(last: {error}); no further requests sent"
        )
        self.stats.breaker_open = True
        print(f"dictbench: {self._fatal}", file=sys.stderr, flush=True)
        return True

    def _read(self, resp: Any) -> Reply:
        usage = getattr(resp, "usage", None)
        if usage is not None:
            self.stats.prompt_tokens += int(getattr(usage, "prompt_tokens", 0) or 0)
            self.stats.completion_tokens += int(getattr(usage, "completion_tokens", 0) or 0)
        choices = getattr(resp, "choices", None)
        if not choices:
            return Reply(None, "malformed reply: no choices")
        content = getattr(choices[0].message, "content", None)
        if not isinstance(content, str):
            return Reply(None, "malformed reply: no message content")
        return Reply(
            content,
            usage={
                "prompt_tokens": getattr(usage, "prompt_tokens", None),
                "completion_tokens": getattr(usage, "completion_tokens", None),
            },
        )

    def _delay(self, attempt: int, headers: Any) -> float:
        s = self.settings
        if headers is not None:
            try:
                return min(s.backoff_max_s, max(0.0, float(headers.get("retry-after"))))
            except (TypeError, ValueError):
                pass
        return min(s.backoff_max_s, s.backoff_s * 2**attempt) * self._jitter.uniform(0.5, 1.0)

    def _describe(self, e: Exception) -> str:
        status = getattr(e, "status_code", None)
        head = type(e).__name__ + (f" (HTTP {status})" if status else "")
        text = (str(e).strip().splitlines() or [""])[0][:200]
        return redact(f"{head}: {text}" if text else head, self.settings.api_key)
