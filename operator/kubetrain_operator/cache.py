"""What the watches last showed of each job, its pods and its Service: an informer's cache, fed by kopf's watch events.

The periodic look at a running job (live progress) plans from this cache instead of three reads, so a
thousand running jobs cost the API server a status write each per interval, not four calls. The cache is
only trusted for progress: a plan made from it that would do anything but move step/progress forward is
thrown away and made again from fresh reads (`progress_only`), and every job gets a fresh look at least
every `FULL_REFRESH_SECONDS` anyway (a watch that was re-listed can miss a deletion). Event-driven
reconciles always read fresh.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from .names import LABEL_JOB
from .records import Plan

JobKey = tuple[str, str]
FULL_REFRESH_SECONDS = 300.0
# The only status fields a plan made from the cache may change: what a live scrape brings.
PROGRESS_FIELDS = frozenset({"step", "progress", "lastCheckpoint"})


class WatchCache:
    def __init__(self):
        self._jobs: dict[JobKey, dict] = {}
        self._pods: defaultdict[JobKey, dict[str, dict]] = defaultdict(dict)  # by pod uid
        self._services: dict[JobKey, dict] = {}
        self._fresh_at: dict[JobKey, float] = {}  # when a reconcile last read the job from the API server
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
            for table in (self._jobs, self._pods, self._services, self._fresh_at):
                table.pop(key, None)

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {"jobs": len(self._jobs), "pods": sum(map(len, self._pods.values())), "services": len(self._services)}

    @staticmethod
    def _child_key(body: dict) -> JobKey | None:
        meta = body["metadata"]
        job = (meta.get("labels") or {}).get(LABEL_JOB)
        return (meta.get("namespace", ""), job) if job else None


def progress_only(old_status: dict | None, plan: Plan) -> bool:
    """True when `plan` only moves live progress: safe to apply though it was made from the cache."""
    if (plan.create or plan.replace_config is not None or plan.delete_pods or plan.events or plan.delete_job
            or plan.suspend_job):
        return False
    if plan.status is None:
        return True
    old = old_status or {}
    changed = {k for k in set(old) | set(plan.status) if old.get(k) != plan.status.get(k)}
    return changed <= PROGRESS_FIELDS


def _key(body: dict) -> JobKey:
    return body["metadata"].get("namespace", ""), body["metadata"]["name"]
