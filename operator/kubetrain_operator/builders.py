"""Desired state, as pure functions: TrainingJob -> ConfigMap, headless Service, one Pod per node.

Nothing here talks to the API server, so every manifest can be tested (and diffed) as data.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import yaml

from kubetrain.api import API_VERSION, KIND, SpecError, TrainingJob, parse_training_job
from kubetrain.patterns import DNS_LABEL
from kubetrain.pod_spec import MLFLOW_CREDENTIAL_ENV, S3_CREDENTIAL_ENV
from kubetrain.termination import TERMINATION_MESSAGE_ENV
from kubetrain.torchrun import RDZV_PORT, torchrun_options

from . import gang
from . import names as N

RUN_AS_USER = 1000  # the trainer image's non-root user
# Above the launcher's TORCH_ELASTIC_SHUTDOWN_TIMEOUT (120 s): SIGTERM -> finish the step, save and
# upload the emergency checkpoint, exit 75 -- before the kubelet's SIGKILL.
TERMINATION_GRACE_SECONDS = 180
HOSTNAME_MAX = 63


@dataclass(frozen=True)
class ClusterDefaults:
    """Operator-wide settings (Helm values) for what a job may leave out in a cluster."""

    checkpoint_uri: str | None = None  # used when spec.checkpoint.uri is not s3://
    s3_secret: str | None = None
    s3_endpoint: str | None = None
    # A pod has its own network namespace, so every job can use RDZV_PORT. Where pods share one (the
    # dev cluster), a range gives each job its own port, picked from its uid.
    rendezvous_ports: tuple[int, int] | None = None
    # Creating a TrainingJob is creating pods: a cluster may restrict what those pods run and tolerate.
    allowed_images: tuple[str, ...] = ()  # "registry/team/" (anything under it) or "registry/team/trainer" (any tag)
    allowed_toleration_keys: tuple[str, ...] = ()  # empty: any; else only these keys (and never a key-less one)
    # the NetworkPolicy each job gets: who may scrape trainers' metrics besides the operator
    network_policy: bool = True
    operator_namespace: str | None = None  # the operator's own (None: any namespace with an operator pod)
    metrics_namespaces: tuple[str, ...] = ()  # e.g. ("monitoring",) for Prometheus


def image_allowed(image: str, allowed: tuple[str, ...]) -> bool:
    if not allowed:
        return True
    return any(image.startswith(entry) if entry.endswith("/") else image == entry or image.startswith((entry + ":", entry + "@"))
               for entry in allowed)


def rendezvous_port(uid: str, defaults: ClusterDefaults) -> int:
    if defaults.rendezvous_ports is None:
        return RDZV_PORT
    low, high = defaults.rendezvous_ports
    return low + int(hashlib.sha256(uid.encode()).hexdigest(), 16) % (high - low + 1)


def effective_job(job: TrainingJob, defaults: ClusterDefaults) -> TrainingJob:
    """The job as its pods will run it; raises SpecError for what only fails in a cluster."""
    errors = []
    name, nodes = job.metadata.name, job.spec.nodes
    if not name[0].isalpha():
        errors.append(f"metadata.name: must start with a letter: it names the job's Service (got {name!r})")
    longest = N.pod_name(name, nodes - 1)
    if len(longest) > HOSTNAME_MAX:
        errors.append(f"metadata.name: too long for {nodes} nodes: pod hostname {longest!r} exceeds {HOSTNAME_MAX} characters")
    low, high = defaults.rendezvous_ports or (RDZV_PORT, RDZV_PORT)
    if low <= job.spec.metrics.port <= high:
        errors.append(f"spec.metrics.port: {job.spec.metrics.port} is a rendezvous port ({low}-{high})")
    if not image_allowed(job.spec.image, defaults.allowed_images):
        errors.append(f"spec.image: {job.spec.image!r} is not in the operator's image allowlist "
                      f"({', '.join(defaults.allowed_images)})")
    if defaults.allowed_toleration_keys:
        for i, toleration in enumerate(job.spec.tolerations):
            if toleration.key not in defaults.allowed_toleration_keys:
                what = f"key {toleration.key!r}" if toleration.key else "no key (it tolerates every taint)"
                errors.append(f"spec.tolerations[{i}]: {what} is not allowed by the operator "
                              f"(allowed keys: {', '.join(defaults.allowed_toleration_keys)})")
    checkpoint = job.spec.checkpoint
    if not checkpoint.uri.startswith("s3://"):
        if not defaults.checkpoint_uri:
            errors.append(f"spec.checkpoint.uri: {checkpoint.uri!r} is a local path, which does not survive a pod restart: "
                          "use s3://bucket/prefix (or set the operator's default checkpoint URI)")
        else:
            checkpoint = checkpoint.model_copy(update={
                "uri": defaults.checkpoint_uri,
                "s3_secret": checkpoint.s3_secret or defaults.s3_secret,
                "endpoint": checkpoint.endpoint or defaults.s3_endpoint,
            })
    output = job.spec.output
    if output is not None and not output.uri.startswith("s3://"):  # a pod's disk is gone when it ends
        if not defaults.checkpoint_uri:
            errors.append(f"spec.output.uri: {output.uri!r} is a local path, which is gone with the pod: use "
                          "s3://bucket/prefix (or set the operator's default checkpoint URI)")
        else:
            output = output.model_copy(update={"uri": default_output_uri(defaults.checkpoint_uri, job)})
    if errors:
        raise SpecError("\n".join(errors))
    return job.model_copy(update={"spec": job.spec.model_copy(update={"checkpoint": checkpoint, "output": output})})


def default_output_uri(default_checkpoint_uri: str, job: TrainingJob) -> str:
    """Where a job whose spec.output.uri is a local path writes its model in a cluster: beside its checkpoints."""
    return f"{default_checkpoint_uri.rstrip('/')}/{job.metadata.namespace}/{job.metadata.name}/model"


def job_from_object(body: dict, defaults: ClusterDefaults) -> TrainingJob:
    """The effective job of a TrainingJob object as the API returns it (status is ours, not the spec's)."""
    return effective_job(parse_training_job({k: v for k, v in body.items() if k != "status"}), defaults)


def controller_of(obj: dict) -> dict | None:
    return next((ref for ref in obj.get("metadata", {}).get("ownerReferences") or [] if ref.get("controller")), None)


def controlled_by(obj: dict, uid: str) -> bool:
    """Whether `obj` names the object of this uid as its controller (so it is ours to change)."""
    return (controller_of(obj) or {}).get("uid") == uid


def left_by_predecessor(obj: dict, job_name: str) -> bool:
    """Controlled by an earlier TrainingJob of this name (deleted, its children not yet garbage-collected)."""
    ref = controller_of(obj) or {}
    return ref.get("kind") == KIND and ref.get("apiVersion") == API_VERSION and ref.get("name") == job_name


def owner_reference(body: dict) -> dict:
    meta = body["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def _labels(job: TrainingJob) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubetrain-trainer",
        "app.kubernetes.io/managed-by": N.MANAGED_BY,
        N.LABEL_JOB: job.metadata.name,
    }


def _meta(job: TrainingJob, name: str, owner: dict, labels: dict[str, str] | None = None) -> dict:
    return {"name": name, "namespace": job.metadata.namespace, "labels": labels or _labels(job), "ownerReferences": [owner]}


# libyaml's emitter where PyYAML has it: the pure-Python one was a fifth of the operator's CPU in a burst of new jobs
YAML_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def job_config_yaml(job: TrainingJob) -> str:
    """The TrainingJob the trainer reads (--config): the effective spec, no status, no server fields."""
    doc = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": job.metadata.name, "namespace": job.metadata.namespace,
                     **({"uid": job.metadata.uid} if job.metadata.uid else {})},  # whose checkpoints are its own
        "spec": job.spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
    }
    return yaml.dump(doc, Dumper=YAML_DUMPER, sort_keys=False)


def config_map(job: TrainingJob, owner: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(job, N.config_map_name(job.metadata.name), owner),
        "data": {N.CONFIG_KEY: job_config_yaml(job)},
    }


def spec_hash(job: TrainingJob) -> str:
    """What a running group was made from, runPolicy aside (its fields act without new pods): a pod whose hash
    differs from the job's runs an outdated spec."""
    spec = job.spec.model_dump(by_alias=True, exclude_none=True, mode="json", exclude={"run_policy"})
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def config_hash(config: dict) -> str:
    return hashlib.sha256(config["data"][N.CONFIG_KEY].encode()).hexdigest()[:16]


def service(job: TrainingJob, owner: dict, rdzv_port: int = RDZV_PORT) -> dict:
    """Headless, and publishing not-ready pods: rank 0's DNS name must resolve before anyone is Ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(job, N.service_name(job.metadata.name), owner),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {N.LABEL_JOB: job.metadata.name},
            "ports": [
                {"name": "rendezvous", "port": rdzv_port, "targetPort": rdzv_port, "protocol": "TCP"},
                {"name": "metrics", "port": job.spec.metrics.port, "targetPort": job.spec.metrics.port, "protocol": "TCP"},
            ],
        },
    }


def _env(job: TrainingJob, attempt: int) -> list[dict]:
    env = [
        {"name": "KUBETRAIN_ATTEMPT", "value": str(attempt)},  # a tag of the MLflow run
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        # /metrics on the pod IP: Prometheus and the operator scrape it there
        {"name": "KUBETRAIN_METRICS_ADDR", "value": "$(POD_IP)"},
        {"name": TERMINATION_MESSAGE_ENV, "value": N.TERMINATION_LOG},
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    # the rendezvous id from the job's own Secret: torchrun's store is unauthenticated and the id prefixes the
    # group's keys in it, so it must not be derivable from what `kubectl get pods` shows
    env.append({"name": N.RDZV_ID_ENV, "valueFrom": {"secretKeyRef": {"name": N.rendezvous_secret_name(job.metadata.name),
                                                                      "key": N.RDZV_ID_KEY}}})
    secret = job.spec.checkpoint.s3_secret
    if secret:
        for key, optional in zip(S3_CREDENTIAL_ENV, (False, False, True), strict=True):  # the session token is optional
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}}})
    mlflow = job.spec.tracking.mlflow
    if mlflow is not None and mlflow.secret:  # the tracking server's credentials, never in the spec
        for key in MLFLOW_CREDENTIAL_ENV:
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": mlflow.secret, "key": key, "optional": True}}})
    return env


def _resources(job: TrainingJob) -> dict:
    res = job.spec.resources.model_dump(by_alias=True, exclude_none=True, mode="json")
    return {k: v for k, v in res.items() if v}


def trainer_args(job: TrainingJob, attempt: int, rank: int, rdzv_port: int = RDZV_PORT) -> list[str]:
    """Pod `rank` is node `rank`; pod 0 hosts the rendezvous store and global rank 0 (metrics, reports)."""
    name, ns = job.metadata.name, job.metadata.namespace
    torchrun = torchrun_options(job.spec.nodes, job.spec.procs_per_node, f"{N.pod_dns_name(name, ns, 0)}:{rdzv_port}",
                                f"$({N.RDZV_ID_ENV})-{attempt}", node_rank=rank)
    return [*torchrun, "--", "--config", f"{N.CONFIG_DIR}/{N.CONFIG_KEY}", "--work-dir", N.WORK_DIR,
            "--base-dir", N.IMAGE_EXAMPLES_DIR]


def pod(job: TrainingJob, owner: dict, rank: int, attempt: int, config_digest: str, rdzv_port: int = RDZV_PORT) -> dict:
    name = job.metadata.name
    spec = job.spec
    labels = {**_labels(job), N.LABEL_RANK: str(rank), N.LABEL_ATTEMPT: str(attempt)}
    container = {
        "name": N.CONTAINER,
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "kubetrain_trainer.launch"],
        "args": trainer_args(job, attempt, rank, rdzv_port),
        "env": _env(job, attempt),
        "ports": [
            {"name": "rendezvous", "containerPort": rdzv_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": spec.metrics.port, "protocol": "TCP"},
        ],
        "resources": _resources(job),
        "volumeMounts": [
            {"name": "config", "mountPath": N.CONFIG_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": "/tmp"},
            {"name": "shm", "mountPath": "/dev/shm"},
        ],
        "terminationMessagePath": N.TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec = {
        "hostname": N.pod_name(name, rank),
        "subdomain": N.service_name(name),
        "restartPolicy": "Never",  # the operator restarts whole groups, never single pods
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": N.config_map_name(name)}},
            {"name": "scratch", "emptyDir": {"sizeLimit": spec.scratch_size}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
        ],
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True, mode="json") for t in spec.tolerations]
    if spec.priority_class_name:
        pod_spec["priorityClassName"] = spec.priority_class_name
    _customize(pod_spec, container, spec.pod)
    annotations = {**spec.pod.annotations, "kubetrain.io/config-hash": config_digest, N.ANNOTATION_SPEC_HASH: spec_hash(job)}
    queue = kueue_queue(job)
    if queue:  # Kueue admits the attempt's pods as one group: gated until then, so nothing holds a GPU while queued
        labels = {**labels, N.KUEUE_QUEUE_LABEL: queue, N.KUEUE_POD_GROUP_LABEL: N.pod_group_name(name, attempt)}
        annotations[N.KUEUE_POD_GROUP_COUNT] = str(spec.nodes)
        pod_spec["schedulingGates"] = [{"name": N.KUEUE_ADMISSION_GATE}]
    gang.mark_pod(job, attempt, labels, annotations, pod_spec)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {**_meta(job, N.pod_name(name, rank), owner, {**spec.pod.labels, **labels}), "annotations": annotations},
        "spec": pod_spec,
    }


def kueue_queue(job: TrainingJob) -> str | None:
    """The Kueue LocalQueue the job's metadata names (label kueue.x-k8s.io/queue-name), if a valid one."""
    labels = (job.metadata.model_extra or {}).get("labels") or {}
    queue = labels.get(N.KUEUE_QUEUE_LABEL) if isinstance(labels, dict) else None
    return queue if isinstance(queue, str) and re.match(DNS_LABEL, queue) and len(queue) <= 63 else None


def _customize(pod_spec: dict, container: dict, custom) -> None:
    """spec.pod, added after the operator's own settings (the schema refuses names that would shadow them)."""
    dump = lambda items: [x.model_dump(by_alias=True, exclude_none=True, mode="json") for x in items]  # noqa: E731
    container["env"] += dump(custom.env)
    if custom.env_from:
        container["envFrom"] = dump(custom.env_from)
    container["volumeMounts"] += dump(custom.volume_mounts)
    pod_spec["volumes"] += dump(custom.volumes)
    if custom.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in custom.image_pull_secrets]
    if custom.service_account_name:
        pod_spec["serviceAccountName"] = custom.service_account_name
    pod_spec["automountServiceAccountToken"] = custom.automount_service_account_token
    if custom.affinity:
        pod_spec["affinity"] = custom.affinity.model_dump(by_alias=True, exclude_none=True, mode="json")
    if custom.topology_spread_constraints:
        pod_spec["topologySpreadConstraints"] = dump(custom.topology_spread_constraints)
    if custom.scheduler_name:
        pod_spec["schedulerName"] = custom.scheduler_name


def rendezvous_secret(job: TrainingJob, owner: dict, token: str) -> dict:
    """Created once per job with a random `token` (never replaced: every attempt's pods read the same one)."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(job, N.rendezvous_secret_name(job.metadata.name), owner),
            "stringData": {N.RDZV_ID_KEY: token}}


def network_policy(job: TrainingJob, owner: dict, defaults: ClusterDefaults) -> dict:
    """Trainer pods accept traffic only from pods of the same job (rendezvous, NCCL/gloo on any port), and on
    the metrics port from the operator and the monitoring namespaces. Egress is left open (S3, the hub)."""
    name = job.metadata.name
    metrics = [{"port": job.spec.metrics.port, "protocol": "TCP"}]
    operator = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubetrain-operator"}}}
    if defaults.operator_namespace:
        operator["namespaceSelector"] = {"matchLabels": {"kubernetes.io/metadata.name": defaults.operator_namespace}}
    monitoring = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}
                  for ns in defaults.metrics_namespaces]
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _meta(job, N.network_policy_name(name), owner),
        "spec": {
            "podSelector": {"matchLabels": {N.LABEL_JOB: name}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {N.LABEL_JOB: name}}}]},
                        {"from": [operator, *monitoring], "ports": metrics}],
        },
    }


def pod_group(job: TrainingJob, owner: dict, attempt: int) -> dict | None:
    """The attempt's PodGroup under runPolicy.podGroupPolicy (gang.py), labelled as the job's other objects."""
    return gang.pod_group(job, owner, attempt, _labels(job))


def group(job: TrainingJob, owner: dict, attempt: int, rdzv_port: int = RDZV_PORT) -> tuple[dict, list[dict]]:
    """The ConfigMap and every pod of one attempt (pods name the config they were made for)."""
    config = config_map(job, owner)
    digest = config_hash(config)
    return config, [pod(job, owner, rank, attempt, digest, rdzv_port) for rank in range(job.spec.nodes)]

