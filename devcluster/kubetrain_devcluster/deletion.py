"""Deletion as a real server does it: preconditions, pod grace periods, finalizers, namespaces, GC, eviction."""

from __future__ import annotations

import asyncio
import copy

import aiohttp.web
import kmock

from .errors import api_error, conflict, status_body
from .objects import DEFAULT_GRACE_SECONDS, Key, Obj, meta, now_rfc3339, set_condition
from .resources import NAMESPACES, PODS, Target
from .selectors import request_selector


def ready_to_remove(res: kmock.resource, obj: Obj) -> bool:
    """Being deleted, no finalizers left, and not a pod waiting out its grace period."""
    md = meta(obj)
    return (res != NAMESPACES and bool(md.get("deletionTimestamp")) and not md.get("finalizers")
            and not md.get("deletionGracePeriodSeconds"))



def _delete_options(request: kmock.Request) -> Obj:
    """DeleteOptions from the body, with ``gracePeriodSeconds``/``propagationPolicy`` from the query."""
    options = dict(request.data) if isinstance(request.data, dict) else {}
    for param in ("gracePeriodSeconds", "propagationPolicy"):
        if param in request.params:
            options[param] = request.params[param]
    if options.get("gracePeriodSeconds") is not None:
        try:
            options["gracePeriodSeconds"] = int(options["gracePeriodSeconds"])
        except (TypeError, ValueError):
            raise api_error(400, "gracePeriodSeconds must be an integer") from None
    return options


def _grace_seconds(res: kmock.resource, obj: Obj, requested: int | None) -> int:
    """0 except for a bound, still running pod: the requested or its own grace period."""
    if res != PODS:
        return 0
    if not (obj.get("spec") or {}).get("nodeName") or (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return 0
    if requested is not None:
        return max(0, requested)
    default = (obj.get("spec") or {}).get("terminationGracePeriodSeconds")
    return DEFAULT_GRACE_SECONDS if default is None else int(default)


def _check_preconditions(key: Key, obj: Obj, preconditions: Obj) -> None:
    md = meta(obj)
    for field in ("uid", "resourceVersion"):
        wanted = preconditions.get(field)
        if wanted and wanted != md.get(field):
            raise conflict(key[0], key[2], f"Precondition failed: {field} in precondition: {wanted}, "
                                           f"{field} in object meta: {md.get(field)}")



class DeletionMixin:
    """DELETE, delete-collection, namespace termination, owner GC and the eviction subresource."""

    # -- delete --------------------------------------------------------------------------------

    async def _serve_delete(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        options = _delete_options(request)
        async with self._lock:
            obj = await self._delete(t.key, self._require(t), options)
        return aiohttp.web.json_response(obj)

    async def _serve_delete_collection(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        options = _delete_options(request)
        options.pop("preconditions", None)
        match = request_selector(request.params, t.namespace)
        async with self._lock:
            deleted = [await self._delete(key, obj, options) for key, obj in list(self._live(t.res)) if match(obj)]
        return aiohttp.web.json_response(self._list_body(t, deleted))

    async def _delete(self, key: Key, obj: Obj, options: Obj) -> Obj:
        """Delete as the real server does: preconditions, pod grace, finalizers (lock held)."""
        _check_preconditions(key, obj, options.get("preconditions") or {})
        if key[0] == NAMESPACES:
            return await self._delete_namespace(key, obj)
        grace = _grace_seconds(key[0], obj, options.get("gracePeriodSeconds"))
        md = meta(obj)
        if md.get("deletionTimestamp") and grace >= (md.get("deletionGracePeriodSeconds") or 0):
            return obj  # already going away at least this fast
        if grace > 0 or md.get("finalizers"):
            return await self._mark_deleting(key, obj, grace)
        return await self._remove(key, obj, cascade=options.get("propagationPolicy") != "Orphan")

    async def _mark_deleting(self, key: Key, obj: Obj, grace: int) -> Obj:
        """Set deletionTimestamp (now + grace) and deletionGracePeriodSeconds: MODIFIED."""
        new = copy.deepcopy(obj)
        new["metadata"].update(deletionTimestamp=now_rfc3339(grace), deletionGracePeriodSeconds=grace)
        await self._commit(key, new, obj)
        if ready_to_remove(key[0], new):
            return await self._remove(key, new)
        return new

    async def _delete_namespace(self, key: Key, obj: Obj) -> Obj:
        """Mark the namespace Terminating; a background task empties and then removes it."""
        if meta(obj).get("deletionTimestamp"):
            return obj
        new = copy.deepcopy(obj)
        new["metadata"]["deletionTimestamp"] = now_rfc3339()
        new["status"] = {**(new.get("status") or {}), "phase": "Terminating"}
        await self._commit(key, new, obj)
        self._background(self._finish_namespace(key[2]))
        return new

    async def _finish_namespace(self, namespace: str) -> None:
        """Delete everything in the namespace, wait until it is gone, then remove the namespace."""
        async with self._lock:
            for key, _ in list(self._live()):
                if key[1] == namespace and (current := self._get(key)) is not None:
                    await self._delete(key, current, {})
        while not self._closing.is_set():
            async with self._lock:
                if not any(key[1] == namespace for key, _ in self._live()):
                    ns_key = (NAMESPACES, None, namespace)
                    if (ns := self._get(ns_key)) is not None:
                        await self._remove(ns_key, ns)
                    return
            await asyncio.sleep(0.1)

    async def _collect_dependents(self, owner_uid: str | None) -> None:
        """Background GC: delete the objects whose owners are now all gone."""
        if not owner_uid:
            return
        async with self._lock:
            for key, obj in list(self._live()):
                owners = {ref.get("uid") for ref in meta(obj).get("ownerReferences") or []}
                if owner_uid in owners and not owners & self._live_uids and (current := self._get(key)) is not None:
                    await self._delete(key, current, {})

    async def _collect_if_orphaned(self, key: Key) -> None:
        """Background GC of a new object whose owners are all absent already (created by a controller that
        read its owner just before the owner was deleted): the real garbage collector deletes those too."""
        async with self._lock:
            current = self._get(key)
            if current is None:
                return
            owners = {ref.get("uid") for ref in meta(current).get("ownerReferences") or []}
            if owners and not owners & self._live_uids:
                await self._delete(key, current, {})

    # -- pods ----------------------------------------------------------------------------------

    async def _serve_eviction(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        """Mark the pod DisruptionTarget, then delete it gracefully with the Eviction's options."""
        eviction = request.data if isinstance(request.data, dict) else {}
        async with self._lock:
            pod = self._require(t)
            new = copy.deepcopy(pod)
            set_condition(new, {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                                 "message": "Eviction API: evicting", "lastTransitionTime": now_rfc3339()})
            if new != pod:
                await self._commit(t.key, new, pod)
            await self._delete(t.key, new, eviction.get("deleteOptions") or {})
        return aiohttp.web.json_response(status_body(201), status=201)

    # -- CRDs ----------------------------------------------------------------------------------
