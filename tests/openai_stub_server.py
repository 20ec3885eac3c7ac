"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions protocol.

Tests drive the real ``openai`` client against it, so retries, timeouts and
response parsing are exercised through the SDK's actual transport (whatever HTTP
library it uses) rather than through a mock of one. Replies come from a
``responder`` (messages -> text, or a ``Fault``) and from a ``script`` of faults
handed to requests in arrival order; every request is logged for the test to check.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Fault kinds: "ok", "429", "500", "503", "slow", "garbage" (HTTP 200, body not JSON),
# "no_choices" (valid JSON without choices), "auth_echo" (401 whose body repeats the
# Authorization header, as a careless server might).
FAULTS = ("ok", "429", "500", "503", "slow", "garbage", "no_choices", "auth_echo")


@dataclass
class Fault:
    kind: str


def _usage_count(text: str) -> int:
    return len(text.split())


class StubJudge:
    """``with StubJudge(responder, script=[...]) as stub: ... stub.url ...``"""

    def __init__(
        self,
        responder: Callable[[list[dict[str, Any]]], str | Fault] | None = None,
        script: Iterable[str] = (),
        slow_s: float = 2.0,
        latency_s: float = 0.0,
        retry_after: str | None = "0",
    ) -> None:
        self.responder = responder or (lambda messages: "None")
        self.script = list(script)
        for kind in self.script:
            if kind not in FAULTS:
                raise ValueError(f"unknown fault {kind!r}")
        self.slow_s = slow_s
        self.latency_s = latency_s
        self.retry_after = retry_after
        self.log: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> StubJudge:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    # --- what was asked ----------------------------------------------------------------

    def completed(self) -> list[dict[str, Any]]:
        """Requests answered with a usable chat completion."""
        return [r for r in self.log if r["fault"] == "ok"]

    def _next_fault(self) -> str:
        with self._lock:
            return self.script.pop(0) if self.script else "ok"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None):
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test); nothing to do

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", "0"))
                payload = json.loads(self.rfile.read(length) or b"{}")
                with stub._lock:
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    self._answer(payload)
                finally:
                    with stub._lock:
                        stub.in_flight -= 1

            def _answer(self, payload: dict[str, Any]) -> None:
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, b'{"error": {"message": "no such route"}}')
                    return
                messages = payload.get("messages", [])
                fault = stub._next_fault()
                reply: str | Fault = ""
                if fault == "ok":
                    reply = stub.responder(messages)
                    if isinstance(reply, Fault):
                        fault = reply.kind
                entry = {
                    "model": payload.get("model"),
                    "messages": messages,
                    "params": {k: v for k, v in payload.items() if k not in ("model", "messages")},
                    "authorization": self.headers.get("Authorization"),
                    "fault": fault,
                    "reply": reply if isinstance(reply, str) else None,
                }
                with stub._lock:
                    stub.log.append(entry)
                if stub.latency_s:
                    time.sleep(stub.latency_s)
                self._respond(fault, payload, messages, reply)

            def _respond(self, fault: str, payload: dict, messages: list, reply: Any) -> None:
                retry = {"Retry-After": stub.retry_after} if stub.retry_after is not None else {}
                if fault == "429":
                    body = b'{"error": {"message": "rate limited", "type": "rate_limit"}}'
                    self._send(429, body, retry)
                elif fault in ("500", "503"):
                    self._send(int(fault), b'{"error": {"message": "server error"}}', retry)
                elif fault == "auth_echo":
                    msg = f"invalid key in header: {self.headers.get('Authorization')}"
                    self._send(401, json.dumps({"error": {"message": msg}}).encode())
                elif fault == "garbage":
                    self._send(200, b"<html>this is not json{{")
                elif fault == "no_choices":
                    self._send(200, b'{"id": "x", "object": "chat.completion", "choices": []}')
                elif fault == "slow":
                    time.sleep(stub.slow_s)
                    self._send(200, self._completion(payload, messages, "late reply"))
                else:
                    self._send(200, self._completion(payload, messages, str(reply)))

            def _completion(self, payload: dict, messages: list, text: str) -> bytes:
                prompt = sum(_usage_count(str(m.get("content", ""))) for m in messages)
                completion = _usage_count(text)
                return json.dumps(
                    {
                        "id": "chatcmpl-stub",
                        "object": "chat.completion",
                        "created": 0,
                        "model": payload.get("model", "stub"),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {
                            "prompt_tokens": prompt,
                            "completion_tokens": completion,
                            "total_tokens": prompt + completion,
                        },
                    }
                ).encode()

        return Handler
