"""The operator's watch cache and cadence: pod events and periodic looks plan from what the watches showed (and
what our own writes answered), and may only write the job's status with what they decided there; how often a job
is looked at shrinks as jobs grow in number."""

from __future__ import annotations

import pytest

from kubetrain_operator import cache as cache_module
from kubetrain_operator.cache import WatchCache, status_only
from kubetrain_operator.names import LABEL_JOB
from kubetrain_operator.rechecks import MAX_INTERVAL_S, MIN_INTERVAL_S, cadence
from kubetrain_operator.records import Event, Plan

RUNNING = {"phase": "Running", "attempt": 1, "step": 10, "progress": {"percent": "1%"}}


def body(name: str, uid: str, job: str | None = None) -> dict:
    labels = {LABEL_JOB: job} if job else {}
    return {"metadata": {"name": name, "namespace": "ml", "uid": uid, "labels": labels}}


def test_a_plan_from_the_cache_may_only_write_the_jobs_status() -> None:
    assert status_only(RUNNING, Plan())
    assert status_only(RUNNING, Plan(status={**RUNNING, "step": 20, "progress": {"percent": "2%"}}))
    assert status_only(RUNNING, Plan(status={**RUNNING, "phase": "Succeeded"}, events=[Event("Normal", "Done", "d")]))
    assert status_only(None, Plan(status={"phase": "Pending"}))
    assert not status_only(RUNNING, Plan(events=[Event("Normal", "X", "y")]))  # an event with no guarded write
    assert not status_only(RUNNING, Plan(status=dict(RUNNING), events=[Event("Normal", "X", "y")]))
    assert not status_only(RUNNING, Plan(create=[{"kind": "Pod"}]))
    assert not status_only(RUNNING, Plan(delete_pods=[{"metadata": {}}]))
    assert not status_only(RUNNING, Plan(delete_pod_groups=[{"metadata": {}}]))
    assert not status_only(RUNNING, Plan(replace_config={}))
    assert not status_only(RUNNING, Plan(delete_job=True))
    assert not status_only(RUNNING, Plan(suspend_job=True))


def test_our_writes_reach_the_cache_but_never_overtake_the_watch() -> None:
    watched, key = WatchCache(), ("ml", "tj")
    watched.job_event("ADDED", {**body("tj", "j1"), "kind": "TrainingJob"})
    watched.read_fresh(key)
    job = lambda rv, phase: {"kind": "TrainingJob", "metadata": {"name": "tj", "namespace": "ml", "uid": "j1",  # noqa: E731
                                                                "resourceVersion": rv}, "status": {"phase": phase}}
    watched.job_event("MODIFIED", job("5", "Pending"))
    watched.wrote(job("6", "Running"), based_on="5")  # our status write on the version we had
    assert watched.snapshot(key)[0]["status"]["phase"] == "Running"
    watched.job_event("MODIFIED", job("8", "Running"))
    watched.wrote(job("7", "Restarting"), based_on="6")  # the watch brought a newer one meanwhile: kept
    assert watched.snapshot(key)[0]["metadata"]["resourceVersion"] == "8"

    pod = lambda uid, phase: {**body("tj-0", uid, "tj"), "kind": "Pod", "status": {"phase": phase}}  # noqa: E731
    watched.wrote(pod("p0", "Pending"))  # created: known before its watch event comes
    assert [p["metadata"]["uid"] for p in watched.snapshot(key)[1]] == ["p0"]
    watched.pod_event("MODIFIED", pod("p0", "Running"))
    watched.wrote(pod("p0", "Pending"))  # an answer older than what the watch showed is not kept
    assert watched.snapshot(key)[1][0]["status"]["phase"] == "Running"
    watched.pod_event("DELETED", pod("p1", "Running"))
    watched.wrote(pod("p1", "Pending"))  # an answer read after the watch saw the pod go: not brought back
    assert [p["metadata"]["uid"] for p in watched.snapshot(key)[1]] == ["p0"]
    watched.wrote({**body("tj", "s1", "tj"), "kind": "Service"})
    assert watched.snapshot(key)[2]["metadata"]["uid"] == "s1"


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
