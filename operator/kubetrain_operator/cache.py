"""What the watches last showed of each job, its pods and its Service: an informer's cache, fed by kopf's watch events
and by the responses to our own writes.

Pod events and the periodic looks plan from this cache instead of three reads, so a thousand running jobs cost the
API server a status write each per interval, not four calls. The cache is trusted for decisions that only write
the job's status (a phase, a condition, progress) and their Events: the status write carries the resourceVersion the
plan was made from, so a plan from a job that has moved since is refused (409) and made again from fresh reads, and
the pods' terminal states, which decide the most, never go back. A plan that creates, replaces or deletes an object
is thrown away and made again from fresh reads (`status_only`), as is any plan when the job is due for a fresh look
(every `FULL_REFRESH_SECONDS`: a watch that was re-listed can miss a deletion). What we create or write goes into
the cache from the API server's answer, so the events our own writes cause find the cache already current
(client-go's informers do the same with a mutation cache) instead of planning the same creates again.
Event-driven reconciles of the job itself always read fresh.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from kubetrain.api import KIND

from .names import LABEL_JOB
from .records import Plan

JobKey = tuple[str, str]
FULL_REFRESH_SECONDS = 300.0


class WatchCache:
    def __init__(self):
        self._jobs: dict[JobKey, dict] = {}
        self._pods: defaultdict[JobKey, dict[str, dict]] = defaultdict(dict)  # by pod uid
        self._services: dict[JobKey, dict] = {}
        self._fresh_at: dict[JobKey, float] = {}  # when a reconcile last read the job from the API server
        self._gone: defaultdict[JobKey, set[str]] = defaultdict(set)  # uids of pods the watch saw deleted
        self._lock = threading.Lock()

    def job_event(self, kind: str, body: dict) -> None:
        key = _key(body)
        with self._lock:
            if kind == "DELETED":
                self._jobs.pop(key, None)
            else:
                self._jobs[key] = body

    def pod_event(self, kind: str, body: dict) -> None:
        key, uid = self._child_key(body), body["metadata"].get("uid", "")
        if key is None:
            return
        with self._lock:
            if kind == "DELETED":
                self._pods.get(key, {}).pop(uid, None)
                self._gone[key].add(uid)
            else:
                self._pods[key][uid] = body

    def service_event(self, kind: str, body: dict) -> None:
        key = self._child_key(body)
        if key is None:
            return
        with self._lock:
            if kind == "DELETED":
                self._services.pop(key, None)
            else:
                self._services[key] = body

    def wrote(self, obj: dict, based_on: str | None = None) -> None:
        """The API server's answer to one of our writes. A pod or Service we created is kept until the watch shows
        it (never over what the watch showed, never one it saw deleted); the job we patched replaces the cached one
        only if that is still the version the patch was made from (`based_on`): anything newer came by the watch."""
        kind, meta = obj.get("kind"), obj.get("metadata") or {}
        with self._lock:
            if kind == "Pod" and (key := self._child_key(obj)) and meta.get("uid") not in self._gone.get(key, ()):
                self._pods[key].setdefault(meta.get("uid", ""), obj)
            elif kind == "Service" and (key := self._child_key(obj)):
                self._services.setdefault(key, obj)
            elif kind == KIND:
                key = _key(obj)
                cached = self._jobs.get(key)
                if cached is not None and (cached.get("metadata") or {}).get("resourceVersion") == based_on:
                    self._jobs[key] = obj

    def read_fresh(self, key: JobKey) -> None:
        """A reconcile of `key` just read the API server."""
        with self._lock:
            self._fresh_at[key] = time.monotonic()

    def snapshot(self, key: JobKey) -> tuple[dict, list[dict], dict | None] | None:
        """(job, pods, service) as last watched; None when the job is not cached or due for a fresh look."""
        with self._lock:
            job = self._jobs.get(key)
            fresh = self._fresh_at.get(key)
            if job is None or fresh is None or time.monotonic() - fresh > FULL_REFRESH_SECONDS:
                return None
            return job, list(self._pods.get(key, {}).values()), self._services.get(key)

    def forget(self, key: JobKey) -> None:
        with self._lock:
            for table in (self._jobs, self._pods, self._services, self._fresh_at, self._gone):
                table.pop(key, None)

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {"jobs": len(self._jobs), "pods": sum(map(len, self._pods.values())), "services": len(self._services)}

    @staticmethod
    def _child_key(body: dict) -> JobKey | None:
        meta = body["metadata"]
        job = (meta.get("labels") or {}).get(LABEL_JOB)
        return (meta.get("namespace", ""), job) if job else None


def status_only(old_status: dict | None, plan: Plan) -> bool:
    """True when `plan` writes nothing but the job's status, and Events only with a status change (the guarded
    status write makes the decision once): safe to apply though it was made from the cache."""
    if (plan.create or plan.replace_config is not None or plan.delete_pods or plan.delete_pod_groups
            or plan.delete_job or plan.suspend_job):
        return False
    return not plan.events or (plan.status is not None and plan.status != (old_status or {}))


def _key(body: dict) -> JobKey:
    return body["metadata"].get("namespace", ""), body["metadata"]["name"]
