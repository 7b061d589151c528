"""Gang scheduling (`spec.runPolicy.podGroupPolicy`): the PodGroup of an attempt and what its pods carry.

A group that fits only partly would hold its GPUs at the rendezvous until torchrun gives up; a PodGroup
of minMember = spec.nodes makes the gang scheduler place the attempt whole or not at all. One PodGroup
per attempt (named like Kueue's pod group), so a new attempt never inherits an old group's state; the
previous attempt's is deleted when the next starts, the last one goes with the job (owner reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

from kubernetes.utils import parse_quantity

from kubetrain.api import TrainingJob

from . import names as N

PLURAL = "podgroups"
COSCHEDULING_LABEL = "scheduling.x-k8s.io/pod-group"  # scheduler-plugins reads the group from this label
VOLCANO_ANNOTATION = "scheduling.k8s.io/group-name"  # Volcano reads it from this annotation


@dataclass(frozen=True)
class PodGroupKind:
    group: str
    version: str
    scheduler: str  # the scheduler name its usual install runs under

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


COSCHEDULING = PodGroupKind("scheduling.x-k8s.io", "v1alpha1", "scheduler-plugins-scheduler")
VOLCANO = PodGroupKind("scheduling.volcano.sh", "v1beta1", "volcano")
KINDS = {k.api_version: k for k in (COSCHEDULING, VOLCANO)}


def kind_of(job: TrainingJob) -> PodGroupKind | None:
    policy = job.spec.run_policy.pod_group_policy
    if policy is None:
        return None
    return COSCHEDULING if policy.coscheduling is not None else VOLCANO


def pod_group(job: TrainingJob, owner: dict, attempt: int, labels: dict[str, str]) -> dict | None:
    """The attempt's PodGroup, or None without a podGroupPolicy."""
    kind = kind_of(job)
    if kind is None:
        return None
    policy = job.spec.run_policy.pod_group_policy
    spec: dict = {"minMember": job.spec.nodes}
    need = group_requests(job)
    if need:
        spec["minResources"] = need
    if kind is COSCHEDULING and policy.coscheduling.schedule_timeout_seconds:
        spec["scheduleTimeoutSeconds"] = policy.coscheduling.schedule_timeout_seconds
    if kind is VOLCANO:
        if policy.volcano.queue:
            spec["queue"] = policy.volcano.queue
        if job.spec.priority_class_name:
            spec["priorityClassName"] = job.spec.priority_class_name
    group = pod_group_ref(job, attempt)
    group["metadata"].update(labels=labels, ownerReferences=[owner])
    return {**group, "spec": spec}


def pod_group_ref(job: TrainingJob, attempt: int) -> dict | None:
    """What deleting an attempt's PodGroup needs (None without a podGroupPolicy)."""
    kind = kind_of(job)
    if kind is None:
        return None
    return {"apiVersion": kind.api_version, "kind": "PodGroup",
            "metadata": {"name": N.pod_group_name(job.metadata.name, attempt), "namespace": job.metadata.namespace}}


def mark_pod(job: TrainingJob, attempt: int, labels: dict, annotations: dict, pod_spec: dict) -> None:
    """Name the attempt's PodGroup on a pod and send it to the gang scheduler (unless spec.pod names one:
    scheduler-plugins is also installed as the default scheduler's profile)."""
    kind = kind_of(job)
    if kind is None:
        return
    group = N.pod_group_name(job.metadata.name, attempt)
    if kind is COSCHEDULING:
        labels[COSCHEDULING_LABEL] = group
    else:
        annotations[VOLCANO_ANNOTATION] = group
    if not job.spec.pod.scheduler_name:
        pod_spec["schedulerName"] = kind.scheduler


def group_requests(job: TrainingJob) -> dict[str, str]:
    """Every pod's requests summed over the group (a request defaults to its limit, as the API server does)."""
    res = job.spec.resources
    per_pod = {**res.limits, **res.requests}
    return {name: format_quantity(parse_quantity(q) * job.spec.nodes) for name, q in sorted(per_pod.items())}


def format_quantity(value: Decimal) -> str:
    """Whole numbers as they are, anything finer in milli-units, rounded up (a request never shrinks)."""
    if value == value.to_integral_value():
        return str(int(value))
    return f"{math.ceil(value * 1000)}m"
