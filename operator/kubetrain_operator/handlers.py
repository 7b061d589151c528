"""kopf glue: every trigger -- the job changed, one of its pods changed, a recheck -- runs one reconcile.

The decision is `reconcile.plan` (pure); `kube.Kube` reads and writes. Per-job state lives in the
operator's kopf memo (`JobRegistry`): a lock per job, so a pod event and a recheck never act on the
same job at once, the trainer reports seen on pod watch events, and the watch cache that periodic
looks plan from (`cache.WatchCache`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime

import kopf
from kubernetes.client.exceptions import ApiException

from kubetrain.api import GROUP, PLURAL, VERSION, SpecError, job_checkpoint_prefix

from . import live_progress
from .builders import ClusterDefaults, controller_of, job_from_object
from .cache import WatchCache, status_only
from .kube import Conflict, ForeignObject, Kube, Predecessor, Unserved, observed_of
from .metrics import OperatorMetrics
from .rechecks import Rechecks
from .names import LABEL_ATTEMPT, LABEL_JOB
from .reconcile import plan
from .records import Observed, Plan, PodReport, Progress

log = logging.getLogger("kubetrain.operator")
CONFLICT_RETRIES = 5
RETRY_SECONDS = 5.0  # a periodic look that failed is tried again this soon
JobKey = tuple[str, str]  # (namespace, name)


@dataclass
class JobRegistry:
    """The operator's per-job state, kept in its kopf memo (`memo.jobs`); a job's reports are dropped when it is deleted."""

    locks: defaultdict[JobKey, threading.Lock] = field(default_factory=lambda: defaultdict(threading.Lock))
    # The trainer reports of terminated pods, from watch events, by job and pod uid (see Observed.reports), each
    # with the uid of the TrainingJob object that controls the pod: a predecessor's late reports are not this job's.
    reports: defaultdict[JobKey, dict[str, tuple[str, PodReport]]] = field(default_factory=lambda: defaultdict(dict))
    watched: WatchCache = field(default_factory=WatchCache)

    def reports_of(self, key: JobKey, job_uid: str) -> list[PodReport]:
        return [report for owner, report in self.reports.get(key, {}).values() if owner == job_uid]

    def forget(self, key: JobKey) -> None:
        self.reports.pop(key, None)  # the lock stays: a reconcile of the deleted job may still hold it
        self.watched.forget(key)


def reconcile(memo: kopf.Memo, namespace: str, name: str, scrape: bool = False, cached: bool = False) -> Plan | None:
    """Read, plan, apply; again on a write conflict. Returns the applied plan (None: job gone).
    `cached`: plan from the watch cache first, and apply that plan only if it just moves progress."""
    kube: Kube = memo.kube
    metrics: OperatorMetrics = memo.metrics
    jobs: JobRegistry = memo.jobs
    foreign = unserved = None  # learnt while applying: an object of the job's name not ours, a kind not served
    with jobs.locks[(namespace, name)], metrics.reconcile_seconds.time():
        if cached and (decided := _from_cache(memo, namespace, name, scrape)) is not None:
            return decided
        for _ in range(CONFLICT_RETRIES):
            job = kube.get_job(namespace, name)
            if job is None:
                metrics.observe_phase(namespace, name, None)
                return None
            now = datetime.now(UTC)
            observed = kube.observe(job, now)
            jobs.watched.read_fresh((namespace, name))
            observed.foreign, observed.unserved = observed.foreign or foreign, unserved
            decided = _planned(memo, (namespace, name), observed, scrape)
            try:
                _apply(memo, job, decided, now)
            except Conflict:
                continue
            except ForeignObject as err:  # plan again, knowing: the job fails instead of starting
                foreign = str(err)
                continue
            except Unserved as err:  # plan again, knowing: the job fails, no retry installs a scheduler
                unserved = str(err)
                continue
            except Predecessor as err:
                raise kopf.TemporaryError(f"{err}; waiting for the garbage collector", delay=2) from None
            _count(metrics, job, decided)
            return decided
        raise kopf.TemporaryError(f"{namespace}/{name}: status kept changing under us", delay=1)


def _from_cache(memo: kopf.Memo, namespace: str, name: str, scrape: bool) -> Plan | None:
    """The applied plan, if the watch cache sufficed: a plan that writes only the job's status (and its Events),
    made and written without a read (cache.py says why that is safe)."""
    snapshot = memo.jobs.watched.snapshot((namespace, name))
    if snapshot is None:
        return None
    job, pods, service = snapshot
    for _ in range(2):  # again with the job read fresh if it moved: often kopf's own annotations, not its status
        now = datetime.now(UTC)
        observed = observed_of(job, pods, service, now)
        decided = _planned(memo, (namespace, name), observed, scrape)
        if observed.foreign or not status_only(job.get("status"), decided):
            return None  # objects to write: decided again from fresh reads
        try:
            _apply(memo, job, decided, now)
        except Conflict:
            if (job := memo.kube.get_job(namespace, name)) is None:
                return None
            continue
        _count(memo.metrics, job, decided)
        return decided
    return None


def _apply(memo: kopf.Memo, job: dict, decided: Plan, now: datetime) -> None:
    """Write the plan; what the API server answers goes into the watch cache."""
    based_on = job["metadata"].get("resourceVersion")
    for obj in memo.kube.apply(job, decided, now):
        memo.jobs.watched.wrote(obj, based_on)


def _planned(memo: kopf.Memo, key: tuple[str, str], observed: Observed, scrape: bool) -> Plan:
    """The plan for what was observed, with the pods' kept reports and, when asked, rank 0's live progress."""
    observed.reports = memo.jobs.reports_of(key, observed.job["metadata"].get("uid", ""))
    if scrape:
        observed.live = _scrape(observed, memo.defaults)
    return plan(observed, memo.defaults)


def _scrape(observed: Observed, defaults: ClusterDefaults) -> Progress | None:
    """Rank 0's /metrics of the running attempt, from the pods already listed for this reconcile."""
    status = observed.job.get("status") or {}
    if status.get("phase") != "Running":
        return None
    try:  # the checkpoint URI the pods were given: the job's, or the operator's default
        job = job_from_object(observed.job, defaults)
    except SpecError:
        return None
    attempt = str(status.get("attempt"))
    ips = [p["status"]["podIP"] for p in observed.pods
           if p["metadata"].get("labels", {}).get(LABEL_ATTEMPT) == attempt and p.get("status", {}).get("podIP")]
    prefix = job_checkpoint_prefix(job)
    return live_progress.scrape(ips, job.spec.metrics.port, prefix)


def _count(metrics: OperatorMetrics, job: dict, decided: Plan) -> None:
    before = job.get("status") or {}
    after = decided.status or before
    meta = job["metadata"]
    metrics.observe_phase(meta["namespace"], meta["name"], after.get("phase"))
    if after.get("phase") and after.get("phase") != before.get("phase"):
        metrics.transition(after["phase"])
    if after.get("restarts", 0) > before.get("restarts", 0):
        preempted = after.get("preemptions", 0) > before.get("preemptions", 0)
        metrics.restarts.labels("preemption" if preempted else "failure").inc()
        if preempted:
            metrics.preemptions.inc()


def _guarded(memo: kopf.Memo, namespace: str, name: str, cached: bool = False) -> None:
    """Errors become kopf retries and a metric; never a crashed operator."""
    try:
        reconcile(memo, namespace, name, cached=cached)
    except kopf.TemporaryError:
        memo.metrics.errors.labels("conflict").inc()
        raise
    except ApiException as err:
        memo.metrics.errors.labels("api").inc()
        raise kopf.TemporaryError(f"API error {err.status}: {err.reason}", delay=2) from None
    except Exception as err:  # a bug must not stop the operator from serving other jobs
        memo.metrics.errors.labels("internal").inc()
        log.exception("reconcile of %s/%s failed", namespace, name)
        raise kopf.TemporaryError(f"{type(err).__name__}: {err}", delay=5) from None


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_) -> None:
    settings.posting.level = logging.WARNING  # our own Events describe transitions
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kubetrain.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="kubetrain.io")
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 16
    log.info("kubetrain operator started")


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def job_changed(memo: kopf.Memo, namespace: str, name: str, **_) -> None:
    _guarded(memo, namespace, name)


@kopf.on.event("", "v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
def pod_changed(memo: kopf.Memo, type: str, namespace: str, labels: dict, body: kopf.Body, **_) -> None:  # noqa: A002
    pod = dict(body)
    memo.jobs.watched.pod_event(type, pod)
    report = PodReport.of(pod)
    owner = (controller_of(pod) or {}).get("uid")
    if report and owner:  # kept until the job is deleted: one small record per pod that ever terminated with one
        memo.jobs.reports[(namespace, labels[LABEL_JOB])][body["metadata"]["uid"]] = (owner, report)
    # From the cache, which holds this event: most pod events (our own creates, a pod starting) need no
    # action, and any plan that acts is made again from fresh reads.
    _guarded(memo, namespace, labels[LABEL_JOB], cached=True)


def recheck(memo: kopf.Memo, namespace: str, name: str) -> float | None:
    """Deadlines, TTLs, and live progress: what no watch event announces (run by `Rechecks`, not a kopf timer).
    Returns when to look again; None once the job is gone."""
    started = time.monotonic()
    try:
        decided = reconcile(memo, namespace, name, scrape=True, cached=True)
    except kopf.TemporaryError as err:
        memo.metrics.errors.labels("conflict").inc()
        return err.delay or RETRY_SECONDS
    except ApiException as err:
        memo.metrics.errors.labels("api").inc()
        return None if err.status == 404 else RETRY_SECONDS
    except Exception:  # a bug must not stop the operator from serving other jobs
        memo.metrics.errors.labels("internal").inc()
        log.exception("recheck of %s/%s failed", namespace, name)
        return RETRY_SECONDS
    log.debug("recheck of %s/%s took %.3fs", namespace, name, time.monotonic() - started)
    if decided is None:
        memo.jobs.forget((namespace, name))
        return None
    return decided.requeue_after or math.inf


@kopf.on.startup()
def start_rechecks(memo: kopf.Memo, **_) -> None:
    memo.rechecks = Rechecks(lambda ns, name: recheck(memo, ns, name)).start()


@kopf.on.cleanup()
def stop_rechecks(memo: kopf.Memo, **_) -> None:
    if getattr(memo, "rechecks", None):
        memo.rechecks.stop()


@kopf.on.event(GROUP, VERSION, PLURAL)
def job_seen(memo: kopf.Memo, type: str, namespace: str, name: str, body: kopf.Body, **_) -> None:  # noqa: A002
    """Every job the watch shows is rechecked; a deleted one is dropped (no finalizer holds it)."""
    if type == "DELETED":
        memo.jobs.forget((namespace, name))
        memo.rechecks.forget((namespace, name))
        memo.metrics.observe_phase(namespace, name, None)
    else:
        memo.jobs.watched.job_event(type, dict(body))
        memo.rechecks.track((namespace, name))


@kopf.on.event("", "v1", "services", labels={LABEL_JOB: kopf.PRESENT})
def service_seen(memo: kopf.Memo, type: str, namespace: str, labels: dict, body: kopf.Body, **_) -> None:  # noqa: A002
    """Cached for the periodic looks; a deleted one is made again at once."""
    memo.jobs.watched.service_event(type, dict(body))
    if type == "DELETED":
        _guarded(memo, namespace, labels[LABEL_JOB])
