"""A fault-injecting HTTP proxy for tests: it sits in front of an S3 server (moto's) on
127.0.0.1 and, for the requests a plan names by their count, answers 503 SlowDown, drops the
connection in the middle of the response body, or stalls past the client's read timeout; every
other request is relayed unchanged. Threaded (a bounded number of requests at once) and stopped
at teardown."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "upgrade"}
KINDS = ("503", "drop", "stall")


class FaultProxy:
    """``plan``: request number (0-based, counted over the requests ``methods`` selects) ->
    fault kind (``KINDS``); ``arm(plan)`` restarts the count. ``stall_s``: how long a stalled
    request hangs before its connection is closed (set above the client's read timeout)."""

    def __init__(self, upstream: str, *, stall_s: float = 2.0, max_threads: int = 16) -> None:
        up = urlsplit(upstream)
        self.upstream = (up.hostname or "127.0.0.1", up.port or 80)
        self.stall_s = stall_s
        self.plan: dict[int, str] = {}
        self.methods: tuple[str, ...] = ("GET", "PUT", "HEAD", "POST", "DELETE")
        self.seen = 0  # requests counted since arm()
        self.injected: list[tuple[int, str, str, str]] = []  # (number, kind, method, path)
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_threads)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                with proxy._slots:
                    proxy._handle(self)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    def arm(self, plan: dict[int, str], methods: tuple[str, ...] | None = None) -> None:
        assert all(k in KINDS for k in plan.values()), plan
        with self._lock:
            self.plan, self.seen, self.injected = dict(plan), 0, []
            if methods is not None:
                self.methods = methods

    def _fault(self, method: str, path: str) -> str | None:
        if method not in self.methods:
            return None
        with self._lock:
            n, self.seen = self.seen, self.seen + 1
            kind = self.plan.get(n)
            if kind is not None:
                self.injected.append((n, kind, method, path))
            return kind

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        kind = self._fault(h.command, h.path)
        if kind == "503":
            h.send_response(503, "Slow Down")
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(SLOW_DOWN)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(SLOW_DOWN)
            return
        if kind == "stall":  # the client's read timeout fires first; then the line goes dead
            time.sleep(self.stall_s)
            self._kill(h)
            return
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() != "host"}
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        h.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in HOP_BY_HOP:
                h.send_header(k, v)
        # a HEAD answer keeps the object's length (it has no body of its own)
        size = resp.getheader("Content-Length", "0") if h.command == "HEAD" else len(data)
        h.send_header("Content-Length", str(size))
        h.end_headers()
        if h.command == "HEAD":
            return
        if kind == "drop":  # half the body, then the connection is gone
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            self._kill(h)
            return
        h.wfile.write(data)

    @staticmethod
    def _kill(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
