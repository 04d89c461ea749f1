"""A real HTTP server on 127.0.0.1 for webhook tests: records every request and answers as told.

    with WebhookServer() as server:
        server.script("/slack", Reply(status=429, retry_after_header="0.2"), times=2)
        ... POST to server.url("/slack") ...
        requests = server.wait_for(3, path="/slack")

Replies are scripted per path for the next N requests; after that a path answers 200 "ok".
A `hang` reply holds the response longer than the client's timeout (released on stop()).
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: str = "ok"
    retry_after_header: str | None = None  # Retry-After: seconds or an HTTP date
    retry_after_json: float | None = None  # Discord-style {"retry_after": 0.25, ...}
    hang_s: float = 0.0  # hold the response this long before answering
    trickle_s: float = 0.0  # send the body one byte at a time, this long apart (each read stays short)


HANG = Reply(status=200, hang_s=30.0)


@dataclass(frozen=True)
class RecordedRequest:
    path: str
    headers: dict[str, str]
    raw: bytes
    received_at: float  # time.monotonic() on arrival
    json: Any = field(default=None)


class WebhookServer:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._scripts: dict[str, deque[Reply]] = defaultdict(deque)
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-server", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> WebhookServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # release hanging handlers
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> WebhookServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(self, path: str, reply: Reply, times: int = 1) -> None:
        """Answer the next `times` requests to `path` with `reply` (queued after earlier scripts)."""
        with self._lock:
            self._scripts[path].extend([reply] * times)

    def requests(self, path: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self._requests if path is None or r.path == path]

    def wait_for(self, count: int, path: str | None = None, timeout: float = 10.0) -> list[RecordedRequest]:
        """Block until at least `count` requests (to `path`) arrived; fail the test at the deadline."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [r for r in self._requests if path is None or r.path == path]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {count} request(s) to {path or 'any path'}, got {len(found)}")
                self._lock.wait(left)

    def _next_reply(self, path: str) -> Reply:
        with self._lock:
            queue = self._scripts.get(path)
            return queue.popleft() if queue else Reply()

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)
            self._lock.notify_all()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    parsed = json.loads(raw) if raw else None
                except ValueError:
                    parsed = None
                headers = {k.lower(): v for k, v in self.headers.items()}
                server._record(RecordedRequest(self.path, headers, raw, time.monotonic(), parsed))
                reply = server._next_reply(self.path)
                if reply.hang_s and server._stopping.wait(reply.hang_s):
                    return
                body = reply.body
                if reply.retry_after_json is not None:
                    body = json.dumps({"message": "You are being rate limited.", "retry_after": reply.retry_after_json, "global": False})
                payload = body.encode()
                try:
                    self.send_response(reply.status)
                    if reply.retry_after_header is not None:
                        self.send_header("Retry-After", reply.retry_after_header)
                    self.send_header("Content-Type", "application/json" if reply.retry_after_json is not None else "text/plain")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if not reply.trickle_s:
                        self.wfile.write(payload)
                    for byte in payload if reply.trickle_s else b"":
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        if server._stopping.wait(reply.trickle_s):
                            return
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        return Handler


@pytest.fixture
def webhook_server() -> Iterator[WebhookServer]:
    with WebhookServer() as server:
        yield server
