"""The operator's watch cache and cadence: a periodic look plans from what the watches showed, and may only
move progress with what it decided there; how often a job is looked at shrinks as jobs grow in number."""

from __future__ import annotations

import pytest

from kubetrain_operator import cache as cache_module
from kubetrain_operator.cache import WatchCache, progress_only
from kubetrain_operator.names import LABEL_JOB
from kubetrain_operator.rechecks import MAX_INTERVAL_S, MIN_INTERVAL_S, cadence
from kubetrain_operator.records import Event, Plan

RUNNING = {"phase": "Running", "attempt": 1, "step": 10, "progress": {"percent": "1%"}}


def body(name: str, uid: str, job: str | None = None) -> dict:
    labels = {LABEL_JOB: job} if job else {}
    return {"metadata": {"name": name, "namespace": "ml", "uid": uid, "labels": labels}}


def test_a_plan_from_the_cache_may_only_move_progress() -> None:
    assert progress_only(RUNNING, Plan())
    assert progress_only(RUNNING, Plan(status={**RUNNING, "step": 20, "progress": {"percent": "2%"}}))
    assert progress_only(RUNNING, Plan(status={**RUNNING, "lastCheckpoint": {"step": 20, "uri": "s3://b/p"}}))
    assert not progress_only(RUNNING, Plan(status={**RUNNING, "phase": "Failed"}))
    assert not progress_only(RUNNING, Plan(status={**RUNNING, "attempt": 2}))
    assert not progress_only(RUNNING, Plan(status={k: v for k, v in RUNNING.items() if k != "attempt"}))
    assert not progress_only(RUNNING, Plan(create=[{"kind": "Pod"}]))
    assert not progress_only(RUNNING, Plan(delete_pods=[{"metadata": {}}]))
    assert not progress_only(RUNNING, Plan(events=[Event("Normal", "X", "y")]))
    assert not progress_only(RUNNING, Plan(replace_config={}))
    assert not progress_only(RUNNING, Plan(delete_job=True))
    assert not progress_only(RUNNING, Plan(suspend_job=True))
    assert not progress_only(None, Plan(status={"phase": "Pending"}))


def test_the_cache_follows_the_watches_and_asks_for_a_fresh_look_when_due(monkeypatch: pytest.MonkeyPatch) -> None:
    watched = WatchCache()
    key = ("ml", "tj")
    watched.job_event("ADDED", body("tj", "j1"))
    assert watched.snapshot(key) is None  # never read fresh: nothing to trust yet
    watched.read_fresh(key)
    watched.pod_event("ADDED", body("tj-0", "p0", "tj"))
    watched.pod_event("ADDED", body("tj-1", "p1", "tj"))
    watched.pod_event("ADDED", body("stray", "p9"))  # not a job's pod: not kept
    watched.service_event("ADDED", body("tj", "s1", "tj"))
    job, pods, service = watched.snapshot(key)
    assert job["metadata"]["uid"] == "j1" and {p["metadata"]["uid"] for p in pods} == {"p0", "p1"}
    assert service["metadata"]["uid"] == "s1"
    watched.pod_event("DELETED", body("tj-1", "p1", "tj"))
    watched.service_event("DELETED", body("tj", "s1", "tj"))
    job, pods, service = watched.snapshot(key)
    assert [p["metadata"]["uid"] for p in pods] == ["p0"] and service is None
    assert watched.sizes() == {"jobs": 1, "pods": 1, "services": 0}

    later = cache_module.time.monotonic() + cache_module.FULL_REFRESH_SECONDS + 1
    monkeypatch.setattr(cache_module.time, "monotonic", lambda: later)
    assert watched.snapshot(key) is None  # due for a fresh look however current the cache seems
    watched.read_fresh(key)
    assert watched.snapshot(key) is not None
    watched.forget(key)
    assert watched.snapshot(key) is None and watched.sizes() == {"jobs": 0, "pods": 0, "services": 0}


def test_cadence_stretches_with_the_number_of_jobs_within_bounds_and_is_jittered() -> None:
    assert cadence(1, 0.5) == pytest.approx(MIN_INTERVAL_S)
    assert cadence(75, 0.5) == pytest.approx(50.0)  # 1.5 looks a second across 75 jobs
    assert cadence(10_000, 0.5) == pytest.approx(MAX_INTERVAL_S)
    assert cadence(75, 0.0) == pytest.approx(40.0) and cadence(75, 0.999) == pytest.approx(60.0, rel=1e-2)
    looks_per_s = [n / cadence(n, 0.5) for n in (30, 75, 150)]
    assert max(looks_per_s) == pytest.approx(min(looks_per_s))  # the budget, whatever the count
