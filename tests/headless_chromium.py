"""A minimal DevTools-protocol client for headless Chromium (test helper).

Starts the system ``chromium`` with a fresh profile and every background service off,
attaches to its page over the DevTools websocket (localhost only) and records every
network request the page makes, so a test can assert that there were none beyond the
page's own file.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium with one page; use as a context manager."""

    def __init__(self, binary: str, timeout: float = 60.0) -> None:
        import websocket  # websocket-client, a test extra

        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="dictbench-chromium-")
        self.proc = subprocess.Popen(
            [
                binary,
                *FLAGS,
                f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0",
                "--window-size=1300,1000",
                "about:blank",
            ],  # fmt: skip
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        # No Origin header: Chromium 111+ refuses DevTools websockets from an origin it
        # was not told to allow, and a client that sends none needs no allow-list.
        self.ws = websocket.create_connection(
            self._page_url(port), timeout=timeout, suppress_origin=True
        )
        self.next_id = 0
        self.events: list[dict[str, Any]] = []
        self.call("Network.enable")
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Log.enable")  # CSP violations and failed loads are reported here

    def _page_url(self, port: int) -> str:
        import urllib.request

        deadline = time.monotonic() + self.timeout
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            if time.monotonic() > deadline:
                raise RuntimeError("chromium has no page target")
            time.sleep(0.1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and wait for its reply; events met meanwhile are kept."""
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def eval(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (exceptions raise)."""
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"page threw: {res['exceptionDetails']}")
        return res["result"].get("value")

    def open(self, url: str) -> None:
        """Navigate and wait until the page's script has set body[data-ready]."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + self.timeout
        while self.eval("document.body && document.body.getAttribute('data-ready')") != "1":
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url}: the page did not finish drawing")
            time.sleep(0.1)

    def requests(self) -> list[str]:
        """URLs of every request the page has made so far."""
        self.eval("1")  # flush events that arrived after the last reply
        return [
            e["params"]["request"]["url"]
            for e in self.events
            if e["method"] == "Network.requestWillBeSent"
        ]

    def console_errors(self) -> list[str]:
        return [
            json.dumps(e["params"])[:300]
            for e in self.events
            if e["method"] == "Runtime.exceptionThrown"
            or (e["method"] == "Runtime.consoleAPICalled" and e["params"].get("type") == "error")
            or (e["method"] == "Log.entryAdded" and e["params"]["entry"].get("level") == "error")
        ]

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
