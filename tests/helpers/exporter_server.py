"""A real HTTP server on 127.0.0.1 that serves scrape targets (GET) the way a test tells it to.

    with ExporterServer() as server:
        server.serve("/metrics", Page(body=text))
        server.serve("/old", Page(status=301, headers={"Location": "/metrics"}))
        server.serve("/slow", Page(body=text, trickle_s=0.05))   # one byte at a time
        server.serve("/cut", Page(body=text[:-3], framing="close"))  # no Content-Length

Every GET is recorded (path with query, headers); an unknown path answers 404.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal


@dataclass(frozen=True)
class Page:
    status: int = 200
    body: bytes | str = b""
    headers: dict[str, str] = field(default_factory=dict)
    # "length": Content-Length; "close": no length, the body ends when the connection closes.
    framing: Literal["length", "close"] = "length"
    trickle_s: float = 0.0  # send the body one byte at a time, this long apart (each read stays short)


@dataclass(frozen=True)
class Request:
    path: str
    headers: dict[str, str]
    received_at: float  # time.monotonic() on arrival


class ExporterServer:
    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._pages: dict[str, Page] = {}
        self._requests: list[Request] = []
        self.stopping = threading.Event()  # ends trickling replies
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="exporter-server", daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}{path}"

    def serve(self, path: str, page: Page) -> None:
        with self._lock:
            self._pages[path] = page

    def requests(self, path: str | None = None) -> list[Request]:
        with self._lock:
            return [r for r in self._requests if path is None or r.path == path]

    def wait_for(self, count: int, path: str, timeout: float = 10.0) -> list[Request]:
        """Block until at least `count` requests to `path` arrived; fail the test at the deadline."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(found := [r for r in self._requests if r.path == path]) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {count} request(s) to {path}, got {len(found)}")
                self._lock.wait(left)
            return found

    def __enter__(self) -> ExporterServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):  # HTTP/1.0: one request per connection
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                with server._lock:
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    server._requests.append(Request(self.path, headers, time.monotonic()))
                    server._lock.notify_all()
                    page = server._pages.get(self.path, Page(status=404, body=b"not found"))
                body = page.body.encode() if isinstance(page.body, str) else page.body
                try:
                    self.send_response(page.status)
                    for name, value in page.headers.items():
                        self.send_header(name, value)
                    if page.framing == "length":
                        self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if not page.trickle_s:
                        self.wfile.write(body)
                        return
                    for byte in body:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        if server.stopping.wait(page.trickle_s):
                            return
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up: what the timeout tests want

            def log_message(self, *args: Any) -> None:
                pass  # keep test output clean

        return Handler
