"""The records a reconcile reads and writes: what it observed, and the plan it decided on.

`reconcile.plan` turns an `Observed` into a `Plan`; `kube.Kube` gathers the one and applies the other;
`live_progress` and the trainer's termination reports supply `Progress`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from kubetrain.api import CheckpointRef
from kubetrain.termination import TrainerReport

from .recovery import PodOutcome, classify_terminated, pod_attempt, trainer_report


@dataclass(frozen=True)
class Progress:
    """What the trainer says about itself (termination message or a /metrics scrape)."""

    step: int | None = None
    checkpoint: CheckpointRef | None = None
    start: dict | None = None  # where the run started (resume.Start: step, checkpoint, why, changed)
    total_steps: int | None = None  # the rest: only from a live scrape
    eta_seconds: float | None = None
    tokens_per_second: float | None = None
    eval: dict | None = None


@dataclass(frozen=True)
class PodReport:
    """A trainer report seen on a pod's watch event, with the attempt of the pod that wrote it."""

    attempt: int
    report: TrainerReport
    outcome: PodOutcome | None = None  # how the pod ended, read as `recovery` reads it (its name, exit code)

    @classmethod
    def of(cls, pod: dict) -> PodReport | None:
        """The report a terminated pod carries, if any."""
        report = trainer_report(pod)
        return cls(pod_attempt(pod), report, classify_terminated(pod)) if report else None


@dataclass
class Observed:
    job: dict  # the TrainingJob as the API returns it
    pods: list[dict]  # every pod labelled with the job's name
    has_service: bool
    now: datetime
    live: Progress | None = None  # scraped from rank 0's /metrics while running
    # Trainer reports seen on pod watch events: a pod deleted right after it terminated (suspend, restart)
    # may be gone before a reconcile lists it, and its report is the newest checkpoint.
    reports: list[PodReport] = field(default_factory=list)
    # An object the job needs under its own name that another owner holds (a ConfigMap or Service the
    # operator did not create): a message; the job fails rather than adopt or overwrite it.
    foreign: str | None = None
    # runPolicy.podGroupPolicy asks for a PodGroup kind the cluster does not serve (learnt when creating
    # one): a message; the job fails, as no retry installs a scheduler.
    unserved: str | None = None
    # A fresh random token from the I/O layer, for the job's rendezvous Secret when it is first created
    # (plan stays a pure function of what it is given).
    token: str = ""
    # Pods labelled with the job's name that a deleted TrainingJob of that name still controls (being
    # garbage-collected): not this job's, never read as its progress; its pods wait until they are gone.
    predecessor_pods: int = 0


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass
class Plan:
    create: list[dict] = field(default_factory=list)  # in order: ConfigMap, Service, Pods
    replace_config: dict | None = None  # a new attempt runs the current spec
    delete_pods: list[dict] = field(default_factory=list)  # pods (uid preconditions) to delete gracefully
    delete_pod_groups: list[dict] = field(default_factory=list)  # a finished attempt's PodGroup (gang.pod_group_ref)
    status: dict | None = None  # the full new status, or None if unchanged
    events: list[Event] = field(default_factory=list)
    delete_job: bool = False  # ttlSecondsAfterFinished passed
    suspend_job: bool = False  # set spec.runPolicy.suspend (runPolicy.schedulingTimeoutPolicy: Suspend)
    requeue_after: float | None = None  # look again this soon (a deadline, a TTL, a grace period)
    live: bool = False  # running: look again for its live progress (on the operator's progress cadence)
