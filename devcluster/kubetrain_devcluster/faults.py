"""Fault injection: armed faults fail matching requests before they touch anything."""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import aiohttp.web
import kmock

from .errors import api_error
from .objects import Obj
from .patches import checked_object

FAULTS_PATH = "/_kubetrain/faults"


@dataclasses.dataclass
class Fault:
    """Fail requests that match ``methods`` and ``path_regex`` with ``status``: the next ``count``
    of them, or every one for ``seconds`` (then ``count``, if given, caps them too)."""

    status: int
    count: int | None = 1
    methods: frozenset[str] = frozenset()
    path_regex: str = ""
    message: str = ""
    until: float | None = None  # time.monotonic() deadline
    hits: int = 0

    @classmethod
    def from_json(cls, body: Any) -> Fault:
        body = checked_object(body)
        try:
            seconds = body.get("seconds")
            count = body.get("count", None if seconds is not None else 1)
            fault = cls(status=int(body["status"]), count=None if count is None else int(count),
                        methods=frozenset(m.upper() for m in body.get("methods") or ()),
                        path_regex=str(body.get("pathRegex") or ""), message=str(body.get("message") or ""),
                        until=None if seconds is None else time.monotonic() + float(seconds))
            re.compile(fault.path_regex)
        except (KeyError, TypeError, ValueError, re.error) as e:
            raise api_error(400, f"invalid fault: {e}") from e
        if not 400 <= fault.status <= 599 or (fault.count is not None and fault.count < 1):
            raise api_error(400, "invalid fault: status must be 4xx/5xx and count >= 1")
        return fault

    @property
    def spent(self) -> bool:
        return (self.count is not None and self.count <= 0) or (self.until is not None and time.monotonic() >= self.until)

    def matches(self, method: str, path: str) -> bool:
        return (not self.methods or method.upper() in self.methods) and bool(re.search(self.path_regex, path))

    def to_json(self) -> Obj:
        return {"status": self.status, "count": self.count, "methods": sorted(self.methods),
                "pathRegex": self.path_regex, "message": self.message, "hits": self.hits,
                "secondsLeft": None if self.until is None else max(0.0, round(self.until - time.monotonic(), 3))}



class FaultsMixin:
    """``/_kubetrain/faults`` of the emulator: arm, list and clear faults; check every request."""

    def _serve_faults(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        method = request.method.upper()
        if method == "POST":
            fault = Fault.from_json(request.data)
            self._faults.append(fault)
            return aiohttp.web.json_response(fault.to_json(), status=201)
        if method == "DELETE":
            self._faults.clear()
        elif method != "GET":
            raise api_error(405, "faults: use GET, POST or DELETE")
        return aiohttp.web.json_response({"faults": [f.to_json() for f in self._faults if not f.spent],
                                          "spent": [f.to_json() for f in self._faults if f.spent]})

    def _check_faults(self, method: str, path: str) -> None:
        """Fail this request if an armed fault matches it (before it has any effect)."""
        for fault in self._faults:
            if not fault.spent and fault.matches(method, path):
                fault.hits += 1
                if fault.count is not None:
                    fault.count -= 1
                raise api_error(fault.status, fault.message or f"injected fault ({fault.status})")
