"""What the trainer, the operator and the dashboards agree on, defined once.

Phases and condition reasons (status.phase, status.conditions[].reason, Event reasons), the
timestamp format of status fields and manifests, and the names of the trainer's and the operator's
Prometheus series (queried by the operator's live-progress scrape, the dashboards and the alerts).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

RFC3339 = "%Y-%m-%dT%H:%M:%SZ"  # Kubernetes' timestamps: UTC, whole seconds


def timestamp(moment: datetime | float | None = None) -> str:
    """RFC 3339 UTC with seconds, as Kubernetes writes them: now, a datetime or a Unix time."""
    if moment is None:
        moment = datetime.now(UTC)
    elif isinstance(moment, int | float):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.astimezone(UTC).strftime(RFC3339)


def parse_timestamp(value: str | None) -> datetime | None:
    return datetime.strptime(value, RFC3339).replace(tzinfo=UTC) if value else None


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


TERMINAL_PHASES = (Phase.SUCCEEDED, Phase.FAILED)


class Reason(StrEnum):
    """Reasons of the TrainingJob's conditions and Events (what `kubectl describe tj` shows)."""

    GROUP_CREATED = "GroupCreated"
    CREATED = "Created"
    GROUP_RUNNING = "GroupRunning"
    JOB_SUCCEEDED = "JobSucceeded"
    PREEMPTED = "Preempted"
    POD_FAILED = "PodFailed"
    INVALID_SPEC = "InvalidSpec"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    NAME_CONFLICT = "NameConflict"  # an object the job needs under its name belongs to someone else
    POD_GROUP_UNAVAILABLE = "PodGroupUnavailable"  # runPolicy.podGroupPolicy, and the cluster serves no PodGroup
    RESTARTED = "Restarted"
    SUSPENDING = "Suspending"
    JOB_SUSPENDED = "JobSuspended"
    JOB_RESUMED = "JobResumed"
    RESUMED = "Resumed"
    # the trainer's permanent failures (reason of its report; the job fails at the first attempt)
    DATA_ERROR = "DataError"
    STORAGE_ERROR = "StorageError"
    MODEL_ERROR = "ModelError"
    CHECKPOINT_INCOMPATIBLE = "CheckpointIncompatible"
    DIVERGED = "Diverged"
    OUT_OF_MEMORY = "OutOfMemory"
    PEER_LOST = "PeerLost"  # transient, and a symptom: another worker's failure is the cause
    # what the operator learns from a running trainer and from spec edits
    RESUMED_FROM_CHECKPOINT = "ResumedFromCheckpoint"
    STARTED_FROM_SCRATCH = "StartedFromScratch"
    CHECKPOINTS_LOST = "CheckpointsLost"
    SETTINGS_CHANGED = "SettingsChanged"
    SPEC_CHANGED = "SpecChanged"
    MODEL_EXPORTED = "ModelExported"  # spec.output: the trained model landed
    # a group that cannot start: the condition Waiting carries the kubelet's or the scheduler's reason
    PODS_STARTED = "PodsStarted"
    SCHEDULING_TIMEOUT = "SchedulingTimeout"


class CheckpointReason(StrEnum):
    """Why a checkpoint was taken (manifest `reason`, metric label `reason`)."""

    PERIODIC = "periodic"
    PREEMPTION = "preemption"
    FINAL = "final"
    RESCUE = "rescue"  # written by rank 0 alone after a peer died without grace
    BEST = "best"  # output.from: best: the weights of a new best evaluation, kept through retention


class TrainerMetric(StrEnum):
    """Series the trainer's rank 0 exports (prometheus_client adds `_total` to counters, `_bucket` ... to histograms)."""

    STEP = "kubetrain_train_step"
    TOTAL_STEPS = "kubetrain_train_total_steps"
    EPOCH = "kubetrain_train_epoch"
    LOSS = "kubetrain_train_loss"
    LEARNING_RATE = "kubetrain_learning_rate"
    GRAD_NORM = "kubetrain_grad_norm"
    SAMPLES_PER_SECOND = "kubetrain_samples_per_second"
    TOKENS_PER_SECOND = "kubetrain_tokens_per_second"
    PADDING_RATIO = "kubetrain_padding_ratio"
    MODEL_FLOPS = "kubetrain_model_flops_per_second"
    MFU = "kubetrain_mfu_ratio"
    ETA_SECONDS = "kubetrain_eta_seconds"
    GOODPUT = "kubetrain_goodput_ratio"
    EVAL_METRIC = "kubetrain_eval_metric"
    LAST_CHECKPOINT_STEP = "kubetrain_last_checkpoint_step"
    LAST_CHECKPOINT_TIMESTAMP = "kubetrain_last_checkpoint_timestamp_seconds"
    CHECKPOINT_BYTES = "kubetrain_checkpoint_bytes"
    CHECKPOINT_DURATION = "kubetrain_checkpoint_duration_seconds"  # histogram
    LAST_CHECKPOINT_DURATION = "kubetrain_last_checkpoint_duration_seconds"  # label phase
    CHECKPOINTS = "kubetrain_checkpoints"  # counter
    CHECKPOINT_FAILURES = "kubetrain_checkpoint_failures"  # counter
    CHECKPOINT_RETRIES = "kubetrain_checkpoint_retries"  # counter
    CHECKPOINTS_SUPERSEDED = "kubetrain_checkpoints_superseded"  # counter
    TRACKING_ERRORS = "kubetrain_tracking_errors"  # counter: MLflow requests that failed (retried)
    SAMPLES = "kubetrain_train_samples"  # counter
    TOKENS = "kubetrain_train_tokens"  # counter
    RESUMED_FROM_STEP = "kubetrain_resumed_from_step"
    STARTED_FROM = "kubetrain_train_started_from"  # value: the step; labels checkpoint, why, changed
    WORLD_SIZE = "kubetrain_world_size"


class OperatorMetric(StrEnum):
    """Series the operator exports (fleet-wide, no per-job labels)."""

    JOBS = "kubetrain_operator_jobs"
    RESTARTS = "kubetrain_operator_restarts_total"
    PREEMPTIONS = "kubetrain_operator_preemptions_total"
    RECONCILE_DURATION = "kubetrain_operator_reconcile_duration_seconds"  # histogram
    RECONCILE_ERRORS = "kubetrain_operator_reconcile_errors_total"
    PHASE_TRANSITIONS = "kubetrain_operator_phase_transitions_total"
    LEADER = "kubetrain_operator_leader"  # 1 on the replica that holds the leader Lease (or runs alone), else 0


def total(counter: str) -> str:
    """The exported name of a counter (prometheus_client appends `_total`)."""
    return counter if counter.endswith("_total") else f"{counter}_total"


# kube-apiserver decodes JSON nested up to 10,000 levels (sigs.k8s.io/json), deeper than CPython's default
# recursion limit of 1,000: an object it stores could otherwise crash every client that decodes it.
API_MAX_JSON_DEPTH = 10_000


def accept_api_nesting() -> None:
    """Let this process decode (and re-encode) any object an API server accepts: a recursion limit above
    API_MAX_JSON_DEPTH, and threads started from now on get a C stack that such a decode fits in."""
    import sys
    import threading

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 3 * API_MAX_JSON_DEPTH))
    threading.stack_size(max(threading.stack_size(), 256 << 20))
