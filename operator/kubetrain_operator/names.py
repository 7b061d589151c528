"""Names and labels of the objects the operator creates for a TrainingJob (one place, so nothing drifts)."""

from __future__ import annotations

LABEL_JOB = "kubetrain.io/job-name"
LABEL_RANK = "kubetrain.io/node-rank"
LABEL_ATTEMPT = "kubetrain.io/attempt"
ANNOTATION_SPEC_HASH = "kubetrain.io/spec-hash"  # builders.spec_hash of the spec a pod was made from
MANAGED_BY = "kubetrain-operator"
CONTAINER = "trainer"
CONFIG_KEY = "job.yaml"
CONFIG_DIR = "/etc/kubetrain"
WORK_DIR = "/tmp/kubetrain"  # an emptyDir: the root filesystem is read-only
TERMINATION_LOG = "/dev/termination-log"
IMAGE_EXAMPLES_DIR = "/opt/kubetrain/examples"  # the trainer image ships examples/ here


def service_name(job: str) -> str:
    """The headless Service; also the pods' DNS subdomain."""
    return job


def config_map_name(job: str) -> str:
    return f"{job}-config"


def rendezvous_secret_name(job: str) -> str:
    """The job's rendezvous id, kept out of the pod spec (anyone who lists pods sees their args)."""
    return f"{job}-rendezvous"


RDZV_ID_KEY = "id"
RDZV_ID_ENV = "KUBETRAIN_RDZV_ID"


def network_policy_name(job: str) -> str:
    return f"{job}-trainers"


def pod_name(job: str, rank: int) -> str:
    """Stable per rank (like a StatefulSet): a recreated group reuses the names once the old pods are gone."""
    return f"{job}-{rank}"


def pod_dns_name(job: str, namespace: str, rank: int) -> str:
    return f"{pod_name(job, rank)}.{service_name(job)}.{namespace}.svc"


def job_selector(job: str) -> str:
    return f"{LABEL_JOB}={job}"

# Kueue's plain-pod groups: a job labelled with a queue gets its pods admitted by Kueue as one group per attempt
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_POD_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_POD_GROUP_COUNT = "kueue.x-k8s.io/pod-group-total-count"
KUEUE_ADMISSION_GATE = "kueue.x-k8s.io/admission"


def pod_group_name(job: str, attempt: int) -> str:
    return f"{job}-attempt-{attempt}"
