"""Is this pod preempted, failed, or fine? Pure functions over Pod objects as the API returns them.

A preemption (the machine was taken away) restarts the group without counting against backoffLimit;
a failure (the training itself broke) counts. Evidence of a preemption, strongest first:
- the pod carries the DisruptionTarget condition (eviction, taint manager, preemption by priority);
- the pod status reason says the node went away (NodeLost, Evicted, Shutdown, ...);
- the pod is being deleted, or vanished, while its group was running (nobody but us should);
- the trainer exited with EXIT_PREEMPTED: it caught SIGTERM and saved an emergency checkpoint.

A permanent failure (EXIT_PERMANENT: bad data, a missing bucket, divergence...) fails the job at once:
another attempt would meet it again. The trainer's report names it in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from kubetrain.api import EXIT_INVALID_SPEC, EXIT_PERMANENT, EXIT_PREEMPTED
from kubetrain.contracts import Reason, parse_timestamp
from kubetrain.termination import TrainerReport, decode_report

from .names import CONTAINER, LABEL_ATTEMPT

# a container that waits for one of these will not start by itself soon (the kubelet's reasons)
STUCK_WAITING_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                                   "RegistryUnavailable", "CreateContainerConfigError", "CreateContainerError",
                                   "CreateContainerSandboxError"})
NODE_GONE_REASONS = frozenset({"NodeLost", "Evicted", "Shutdown", "NodeShutdown", "Terminated", "Preempting",
                               "DeletionByTaintManager", "NodeRestarted"})
Kind = Literal["pending", "running", "succeeded", "preempted", "failed", "permanent", "invalid"]


@dataclass(frozen=True)
class PodOutcome:
    kind: Kind
    reason: str = ""
    message: str = ""
    symptom: bool = False  # failed because a peer did (the trainer said PeerLost): the peer's account says why
    finished_at: datetime | None = None  # when its container ended (failed pods, where the kubelet said)


def container_status(pod: dict) -> dict:
    for status in pod.get("status", {}).get("containerStatuses") or []:
        if status.get("name") == CONTAINER:
            return status
    return {}


def terminated_state(pod: dict) -> dict | None:
    return (container_status(pod).get("state") or {}).get("terminated")


def trainer_report(pod: dict) -> TrainerReport | None:
    terminated = terminated_state(pod)
    return decode_report(terminated.get("message")) if terminated else None


def disruption(pod: dict) -> str | None:
    """Why the platform (not the training) took this pod away, if it did; hard evidence only."""
    status = pod.get("status", {})
    for cond in status.get("conditions") or []:
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return f"{cond.get('reason') or 'DisruptionTarget'}: {cond.get('message') or 'pod disrupted'}"
    if status.get("reason") in NODE_GONE_REASONS:
        return f"{status['reason']}: {status.get('message') or 'node gone'}"
    return None


def observed_time(value) -> datetime | None:
    """A timestamp the API server or the kubelet wrote (creationTimestamp, finishedAt); None if absent or malformed."""
    try:
        return parse_timestamp(value)
    except (TypeError, ValueError):  # not RFC 3339: unknown
        return None


def _one_line(text: str, limit: int = 400) -> str:
    return " ".join(text.split())[:limit]


def _tail(text: str, lines: int = 3, limit: int = 400) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])[-limit:]


def waiting_problem(pod: dict) -> tuple[str, str] | None:
    """(reason, message) when a pending pod cannot start, in the scheduler's or the kubelet's words; None when
    it is only starting (being scheduled, pulling, creating)."""
    name, status = pod["metadata"]["name"], pod.get("status", {})
    gates = [g.get("name") for g in pod.get("spec", {}).get("schedulingGates") or [] if isinstance(g, dict)]
    if gates:  # queued, not broken: e.g. Kueue admits the group by removing its gate
        return "SchedulingGated", _one_line(f"pod {name}: waiting for admission (scheduling gate {', '.join(map(str, gates))})")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
            return "Unschedulable", _one_line(f"pod {name}: {cond.get('message') or 'no node fits it'}")
    waiting = (container_status(pod).get("state") or {}).get("waiting") or {}
    reason = waiting.get("reason")
    if reason in STUCK_WAITING_REASONS:
        return reason, _one_line(f"pod {name}: {reason}: {waiting.get('message') or 'no message'}")
    return None


def classify(pod: dict) -> PodOutcome:
    """One pod of a running group, as the operator should read it."""
    name = pod["metadata"]["name"]
    evidence = disruption(pod)
    if evidence:
        return PodOutcome("preempted", Reason.PREEMPTED, f"pod {name}: {evidence}")
    if pod["metadata"].get("deletionTimestamp"):
        return PodOutcome("preempted", Reason.PREEMPTED, f"pod {name} was deleted")
    phase = pod.get("status", {}).get("phase") or "Pending"
    if phase == "Succeeded":
        return PodOutcome("succeeded")
    if phase == "Running":
        return PodOutcome("running")
    if phase != "Failed":
        return PodOutcome("pending")
    terminated = terminated_state(pod) or {}
    code = terminated.get("exitCode")
    if code == EXIT_PREEMPTED:
        return PodOutcome("preempted", Reason.PREEMPTED, f"pod {name}: trainer saved an emergency checkpoint and exited {code}")
    report = decode_report(terminated.get("message"))
    if report and report.outcome == "failed" and report.message:  # the trainer's own one-line account
        why = f"{report.message} (pod {name}, exit code {code})"
        if code == EXIT_INVALID_SPEC or report.reason == Reason.INVALID_SPEC:
            return PodOutcome("invalid", Reason.INVALID_SPEC, why)
        if report.permanent or code == EXIT_PERMANENT:
            return PodOutcome("permanent", report.reason or Reason.POD_FAILED, why)
        return PodOutcome("failed", Reason.POD_FAILED, why, symptom=report.reason == Reason.PEER_LOST,
                          finished_at=observed_time(terminated.get("finishedAt")))
    if terminated.get("reason") == "OOMKilled":
        return PodOutcome("failed", Reason.POD_FAILED, f"pod {name} was OOM-killed (exit code {code}): the container "
                          "ran out of memory; raise spec.resources memory or lower data.maxTokensPerBatch")
    detail = _tail(terminated.get("message") or pod.get("status", {}).get("message") or "")
    why = f"pod {name} failed: exit code {code}" if code is not None else f"pod {name} failed: {pod['status'].get('reason') or 'unknown reason'}"
    if detail:
        why += f": {detail}"
    if code == EXIT_INVALID_SPEC:
        return PodOutcome("invalid", Reason.INVALID_SPEC, why)
    if code == EXIT_PERMANENT:
        return PodOutcome("permanent", Reason.POD_FAILED, why)
    return PodOutcome("failed", Reason.POD_FAILED, why)


def classify_terminated(pod: dict) -> PodOutcome:
    """A pod of the old group as it ended, being deleted or not (deletion alone reads as a preemption)."""
    if not terminated_state(pod):
        return PodOutcome("pending")
    return classify({**pod, "metadata": {k: v for k, v in pod["metadata"].items() if k != "deletionTimestamp"}})


def pod_attempt(pod: dict) -> int:
    try:
        return int(pod["metadata"].get("labels", {}).get(LABEL_ATTEMPT, -1))
    except ValueError:
        return -1
