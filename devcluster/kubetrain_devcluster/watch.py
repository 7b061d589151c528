"""Watches: initial state or a replay after a resourceVersion (410 when too old), then live events."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import aiohttp.web
import kmock

from .errors import api_error, status_body
from .objects import Obj, Selector
from .resources import Target
from .selectors import request_selector
from .tables import wants_table


def _resource_version(value: str | None) -> int | None:
    """A watch's ``resourceVersion``: None or 0 mean "from the current state"."""
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise api_error(400, f"invalid resourceVersion: {value!r}") from None



def _as_seen(event: Obj, match: Selector) -> Obj | None:
    """The event as a watcher with this selector sees it: entering is ADDED, leaving is DELETED."""
    kind, obj, old = event["type"], event["object"], event.get("old")
    now, before = match(obj), old is not None and match(old)
    if kind == "MODIFIED":
        kind = "MODIFIED" if now and before else "ADDED" if now else "DELETED" if before else ""
    elif not now:
        kind = ""
    return {"type": kind, "object": obj} if kind else None



class WatchMixin:
    """The emulator's watch streams (reads its event window and buses under its lock)."""

    # -- watch ---------------------------------------------------------------------------------

    async def _serve_watch(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        """Stream JSON lines until ``timeoutSeconds``, the client hanging up, or server shutdown."""
        raw = request._raw_request
        assert raw is not None
        match = request_selector(request.params, t.namespace, t.name)
        send_initial = request.params.get("sendInitialEvents") == "true"  # kubectl >= 1.35's watch-list
        since = None if send_initial else _resource_version(request.params.get("resourceVersion"))
        events = self._watch_events(t, match, since, initial_events_end=send_initial)
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(raw)
        timeout = request.params.get("timeoutSeconds")
        deadline = asyncio.get_running_loop().time() + float(timeout) if timeout else None
        as_table = wants_table(request)  # kubectl get -w: each event carries a one-row Table
        try:
            while (event := await self._next_event(events, deadline)) is not None:
                if as_table and event["type"] not in ("ERROR", "BOOKMARK"):
                    event = {**event, "object": self._table(t, [event["object"]], str(self._rv))}
                await response.write(json.dumps(event).encode() + b"\n")
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client went away
        finally:
            await events.aclose()
        return response

    async def _next_event(self, events: AsyncIterator[Obj], deadline: float | None) -> Obj | None:
        """The next event, or None at the deadline, at shutdown, or when the stream ended."""
        loop = asyncio.get_running_loop()
        nxt = asyncio.ensure_future(anext(events))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            await asyncio.wait({nxt, closing}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not nxt.done():
                nxt.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await nxt
        if nxt.cancelled():
            return None
        if (exc := nxt.exception()) is None:
            return nxt.result()
        if isinstance(exc, StopAsyncIteration):
            return None
        raise exc

    async def _watch_events(self, t: Target, match: Selector, since: int | None,
                            initial_events_end: bool = False) -> AsyncIterator[Obj]:
        """The initial events (state or replay), then the live ones, as this watcher sees them.

        ``initial_events_end`` (``sendInitialEvents=true``): after the state, a BOOKMARK annotated
        ``k8s.io/initial-events-end``, which a watch-list client waits for before it trusts its cache.
        """
        bus = self._buses[t.res]
        async with self._lock:
            mark = await bus.mark()
            initial = self._initial_events(t.res, match, since)
            bookmark = {"type": "BOOKMARK", "object": {
                "kind": self.resources[t.res].kind, "apiVersion": f"{t.res.group}/{t.res.version}".lstrip("/"),
                "metadata": {"resourceVersion": str(self._rv), "annotations": {"k8s.io/initial-events-end": "true"}}}}
        try:
            for event in initial:
                yield event
            if initial and initial[-1]["type"] == "ERROR":
                return
            if initial_events_end:
                yield bookmark
            async for event in bus.stream(since=mark):
                if (seen := _as_seen(event, match)) is not None:
                    yield seen
        finally:
            await bus.unmark(mark)

    def _initial_events(self, res: kmock.resource, match: Selector, rv: int | None) -> list[Obj]:
        """ADDED for the current state, or a replay after ``rv``, or a 410 ERROR if too old."""
        if not rv:
            return [{"type": "ADDED", "object": obj} for _, obj in self._live(res) if match(obj)]
        if rv < self._expired_rv[res] or rv > self._rv:  # too old, or from before a server restart
            status = status_body(410, f"too old resource version: {rv} ({self._expired_rv[res]})", "Expired")
            return [{"type": "ERROR", "object": status}]
        replay = (_as_seen(e, match) for e in self._events.get(res, ()) if e["rv"] > rv)
        return [e for e in replay if e is not None]
