"""An HTTP proxy in front of the moto S3 server that can refuse or slow down requests on demand.

The dev cluster hands pods the proxy's endpoint, so a reliability test can make "S3" misbehave the
way real object stores do, while every byte still goes through boto3 and the real S3 protocol:

    POST /_kubetrain/s3-faults  {"status": 503, "seconds": 60}                 refuse everything for 60 s
    POST /_kubetrain/s3-faults  {"delaySeconds": 2, "methods": ["PUT"], "pathRegex": "/job-a/"}
                                                                               slow matching requests
    GET  /_kubetrain/s3-faults  armed faults, plus counters: refused, delayed, forwarded, in-flight
    DELETE /_kubetrain/s3-faults                                              disarm all

A refusal is S3's own answer to overload (503 SlowDown, an XML Error body), which botocore treats as
retryable. `seconds` (how long a fault stays armed) and `count` (how many requests it hits) are both
optional; without either a fault stays armed until DELETE. Faults match on method and on a regex
searched in the request path (`/<bucket>/<key>`, path-style addressing).
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

CONTROL_PATH = "/_kubetrain/s3-faults"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class S3Fault:
    """Refuse (status) or slow down (delay_seconds) requests matching methods and path_regex."""

    status: int | None = None
    delay_seconds: float = 0.0
    methods: frozenset[str] = frozenset()
    path_regex: str = ""
    until: float | None = None  # time.monotonic() deadline
    count: int | None = None  # requests left to hit
    hits: int = 0

    @classmethod
    def from_json(cls, body: Any, now: float) -> S3Fault:
        if not isinstance(body, dict):
            raise ValueError("a fault is a JSON object")
        status = body.get("status")
        delay = float(body.get("delaySeconds", 0))
        if status is None and delay <= 0:
            raise ValueError("a fault needs status (refuse) or delaySeconds > 0 (slow down)")
        if status is not None and not 400 <= int(status) <= 599:
            raise ValueError("status must be 4xx or 5xx")
        seconds, count = body.get("seconds"), body.get("count")
        fault = cls(status=None if status is None else int(status), delay_seconds=delay,
                    methods=frozenset(m.upper() for m in body.get("methods") or ()),
                    path_regex=str(body.get("pathRegex") or ""),
                    until=None if seconds is None else now + float(seconds),
                    count=None if count is None else int(count))
        re.compile(fault.path_regex)
        return fault

    def active(self, now: float) -> bool:
        return (self.until is None or now < self.until) and (self.count is None or self.count > 0)

    def matches(self, method: str, path: str) -> bool:
        return (not self.methods or method in self.methods) and bool(re.search(self.path_regex, path))

    def to_json(self, now: float) -> dict[str, Any]:
        return {"status": self.status, "delaySeconds": self.delay_seconds, "methods": sorted(self.methods),
                "pathRegex": self.path_regex, "hits": self.hits, "count": self.count,
                "secondsLeft": None if self.until is None else max(0.0, round(self.until - now, 3))}


@dataclass
class FaultBook:
    """The armed faults and what they did; shared by the handler threads."""

    faults: list[S3Fault] = field(default_factory=list)
    refused: int = 0
    delayed: int = 0
    forwarded: int = 0
    in_flight: dict[str, int] = field(default_factory=dict)  # method -> requests being forwarded now
    lock: threading.Lock = field(default_factory=threading.Lock)

    def arm(self, body: Any) -> None:
        fault = S3Fault.from_json(body, time.monotonic())
        with self.lock:
            self.faults.append(fault)

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def decide(self, method: str, path: str) -> tuple[int | None, float]:
        """-> (status to refuse with or None, seconds to delay first); counts the hit."""
        now, status, delay = time.monotonic(), None, 0.0
        with self.lock:
            self.faults = [f for f in self.faults if f.active(now)]
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    if fault.count is not None:
                        fault.count -= 1
                    delay = max(delay, fault.delay_seconds)
                    status = status or fault.status
            self.refused += status is not None
            self.delayed += status is None and delay > 0
        return status, delay

    def enter(self, method: str) -> None:
        with self.lock:
            self.in_flight[method] = self.in_flight.get(method, 0) + 1

    def leave(self, method: str, forwarded: bool) -> None:
        with self.lock:
            self.in_flight[method] -= 1
            self.forwarded += forwarded

    def report(self) -> dict[str, Any]:
        now = time.monotonic()
        with self.lock:
            return {"faults": [f.to_json(now) for f in self.faults if f.active(now)], "refused": self.refused,
                    "delayed": self.delayed, "forwarded": self.forwarded,
                    "inFlight": {m: n for m, n in self.in_flight.items() if n}}


def _s3_error(status: int) -> bytes:
    code = "SlowDown" if status == 503 else "InternalError" if status == 500 else "AccessDenied" if status == 403 else "Error"
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>injected by the kubetrain S3 fault proxy</Message></Error>").encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as boto3 expects
    server: _ProxyServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass  # moto logs every request already

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        head = self.command == "HEAD"  # a HEAD answer keeps the object's Content-Length, with no body
        for name, value in headers:
            if name.lower() not in HOP_BY_HOP and (head or name.lower() != "content-length"):
                self.send_header(name, value)
        if not head:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _control(self) -> None:
        book = self.server.book
        try:
            if self.command == "POST":
                book.arm(json.loads(self._body() or b"null"))
            elif self.command == "DELETE":
                book.clear()
            elif self.command != "GET":
                raise ValueError(f"{self.command} is not supported here")
        except (ValueError, TypeError, re.error) as e:
            self._send(400, [("Content-Type", "application/json")], json.dumps({"error": str(e)}).encode())
            return
        self._send(200, [("Content-Type", "application/json")], json.dumps(book.report()).encode())

    def _proxy(self) -> None:
        if urlsplit(self.path).path.rstrip("/") == CONTROL_PATH:
            return self._control()
        body, book, status = self._body(), self.server.book, None
        book.enter(self.command)  # in flight from here: a delayed request is an upload in progress
        try:
            status, delay = book.decide(self.command, urlsplit(self.path).path)
            time.sleep(delay)
            if status is not None:
                return self._send(status, [("Content-Type", "application/xml")], _s3_error(status))
            conn = http.client.HTTPConnection(self.server.upstream_host, self.server.upstream_port, timeout=120)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
            conn.close()
        finally:
            book.leave(self.command, forwarded=status is None)
        self._send(resp.status, resp.getheaders(), payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], upstream: str):
        super().__init__(addr, _Handler)
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.book = FaultBook()


class S3FaultProxy:
    """`with S3FaultProxy(s3.endpoint) as proxy:` point clients at `proxy.endpoint`; `proxy.arm({...})`."""

    def __init__(self, upstream: str, host: str = "127.0.0.1"):
        self.upstream, self.host = upstream, host
        self._server: _ProxyServer | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "not started"
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> S3FaultProxy:
        self._server = _ProxyServer((self.host, 0), self.upstream)
        threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # what tests call, in-process; other processes use the HTTP control path
    def arm(self, fault: dict[str, Any]) -> None:
        assert self._server is not None, "not started"
        self._server.book.arm(fault)

    def clear(self) -> None:
        assert self._server is not None, "not started"
        self._server.book.clear()

    def report(self) -> dict[str, Any]:
        assert self._server is not None, "not started"
        return self._server.book.report()
