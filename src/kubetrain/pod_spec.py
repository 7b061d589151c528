"""spec.pod: what a platform team adds to the trainer pods, in the Kubernetes API's own shapes.

Typed and bounded like the rest of the spec (a typo is refused, not dropped), and only what keeps the pod
restricted: volumes are PersistentVolumeClaims, Secrets, ConfigMaps and emptyDirs (no hostPath, no
privileged sources); the container's security context is not configurable; a service account token is
mounted only when asked. Names the operator itself sets (its env, volumes, mount paths, labels) are refused.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from .patterns import DNS_LABEL, DNS_SUBDOMAIN, SIZE

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_.-]{0,255}$"
LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
ABSOLUTE_PATH = r"^/[^\x00-\x1f\x7f]*$"
KEY = r"^[-._A-Za-z0-9]{1,253}$"  # a Secret or ConfigMap key

# What the operator sets itself (tests/unit/test_pod_customization.py checks these against a built pod)
OPERATOR_ENV = frozenset({"POD_IP", "POD_NAME", "HOME", "PYTHONUNBUFFERED"})  # and every KUBETRAIN_* name
OPERATOR_VOLUMES = frozenset({"config", "scratch", "shm"})
OPERATOR_PATHS = ("/etc/kubetrain", "/tmp", "/dev/shm", "/dev/termination-log")
OPERATOR_PREFIX = "kubetrain.io/"  # labels and annotations
# env the operator sets from the Secrets the spec names (checkpoint.s3Secret, tracking.mlflow.secret)
S3_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
MLFLOW_CREDENTIAL_ENV = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


class _K8s(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, strict=True)


# --- env ---------------------------------------------------------------------------------------

class KeyRef(_K8s):
    name: str = Field(..., max_length=253, pattern=DNS_SUBDOMAIN)
    key: str = Field(..., max_length=253, pattern=KEY)
    optional: bool | None = None


class FieldRef(_K8s):
    field_path: Literal["metadata.name", "metadata.namespace", "metadata.uid", "spec.nodeName",
                        "spec.serviceAccountName", "status.hostIP", "status.podIP"]


class EnvSource(_K8s):
    secret_key_ref: KeyRef | None = None
    config_map_key_ref: KeyRef | None = None
    field_ref: FieldRef | None = None

    @model_validator(mode="after")
    def _one(self) -> EnvSource:
        if sum(x is not None for x in (self.secret_key_ref, self.config_map_key_ref, self.field_ref)) != 1:
            raise ValueError("valueFrom takes exactly one of secretKeyRef, configMapKeyRef, fieldRef")
        return self


class EnvVar(_K8s):
    name: str = Field(..., pattern=ENV_NAME)
    value: str | None = Field(None, max_length=32768)
    value_from: EnvSource | None = None

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError(f"env {self.name}: value and valueFrom are exclusive")
        return self


class NameRef(_K8s):
    name: str = Field(..., max_length=253, pattern=DNS_SUBDOMAIN)
    optional: bool | None = None


class EnvFrom(_K8s):
    secret_ref: NameRef | None = None
    config_map_ref: NameRef | None = None
    prefix: str | None = Field(None, max_length=256, pattern=ENV_NAME)

    @model_validator(mode="after")
    def _one(self) -> EnvFrom:
        if (self.secret_ref is None) == (self.config_map_ref is None):
            raise ValueError("envFrom takes exactly one of secretRef, configMapRef")
        return self


# --- volumes -----------------------------------------------------------------------------------

class KeyToPath(_K8s):
    key: str = Field(..., max_length=253, pattern=KEY)
    path: str = Field(..., min_length=1, max_length=4096, pattern=r"^[^/\x00-\x1f\x7f][^\x00-\x1f\x7f]*$")

    @model_validator(mode="after")
    def _relative(self) -> KeyToPath:
        if ".." in self.path.split("/"):
            raise ValueError(f"items path {self.path!r} may not hold '..'")
        return self


class ClaimSource(_K8s):
    claim_name: str = Field(..., max_length=253, pattern=DNS_SUBDOMAIN)
    read_only: bool | None = None


class SecretSource(_K8s):
    secret_name: str = Field(..., max_length=253, pattern=DNS_SUBDOMAIN)
    items: list[KeyToPath] | None = Field(None, max_length=1024)
    optional: bool | None = None


class ConfigMapSource(_K8s):
    name: str = Field(..., max_length=253, pattern=DNS_SUBDOMAIN)
    items: list[KeyToPath] | None = Field(None, max_length=1024)
    optional: bool | None = None


class EmptyDirSource(_K8s):
    medium: Literal["", "Memory"] | None = None
    size_limit: str | None = Field(None, pattern=SIZE)


class Volume(_K8s):
    name: str = Field(..., max_length=63, pattern=DNS_LABEL)
    persistent_volume_claim: ClaimSource | None = None
    secret: SecretSource | None = None
    config_map: ConfigMapSource | None = None
    empty_dir: EmptyDirSource | None = None

    @model_validator(mode="after")
    def _one(self) -> Volume:
        sources = (self.persistent_volume_claim, self.secret, self.config_map, self.empty_dir)
        if sum(x is not None for x in sources) != 1:
            raise ValueError(f"volume {self.name}: exactly one of persistentVolumeClaim, secret, configMap, emptyDir "
                             "(other volume types are not allowed in restricted pods)")
        return self


class VolumeMount(_K8s):
    name: str = Field(..., max_length=63, pattern=DNS_LABEL)
    mount_path: str = Field(..., max_length=4096, pattern=ABSOLUTE_PATH)
    read_only: bool | None = None
    sub_path: str | None = Field(None, max_length=4096, pattern=r"^[^/\x00-\x1f\x7f][^\x00-\x1f\x7f]*$")

    @model_validator(mode="after")
    def _no_escape(self) -> VolumeMount:
        for part in (self.mount_path, self.sub_path or ""):
            if ".." in part.split("/"):
                raise ValueError(f"volumeMount {self.name}: {part!r} may not hold '..'")
        return self


# --- scheduling --------------------------------------------------------------------------------

class LabelRequirement(_K8s):
    key: str = Field(..., max_length=317, pattern=LABEL_KEY)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] | None = Field(None, max_length=256)


class LabelSelector(_K8s):
    match_labels: dict[str, str] | None = Field(None, max_length=64)
    match_expressions: list[LabelRequirement] | None = Field(None, max_length=64)


class NodeRequirement(_K8s):
    key: str = Field(..., max_length=317, pattern=LABEL_KEY)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: list[str] | None = Field(None, max_length=256)


class NodeSelectorTerm(_K8s):
    match_expressions: list[NodeRequirement] | None = Field(None, max_length=64)
    match_fields: list[NodeRequirement] | None = Field(None, max_length=64)


class NodeSelector(_K8s):
    node_selector_terms: list[NodeSelectorTerm] = Field(..., min_length=1, max_length=64)


class PreferredNodeTerm(_K8s):
    weight: int = Field(..., ge=1, le=100)
    preference: NodeSelectorTerm


class NodeAffinity(_K8s):
    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    preferred_during_scheduling_ignored_during_execution: list[PreferredNodeTerm] | None = Field(None, max_length=64)


class PodAffinityTerm(_K8s):
    label_selector: LabelSelector | None = None
    namespaces: list[str] | None = Field(None, max_length=64)
    namespace_selector: LabelSelector | None = None
    topology_key: str = Field(..., max_length=317, pattern=LABEL_KEY)


class WeightedPodAffinityTerm(_K8s):
    weight: int = Field(..., ge=1, le=100)
    pod_affinity_term: PodAffinityTerm


class PodAffinity(_K8s):
    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] | None = Field(None, max_length=64)
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] | None = Field(None, max_length=64)


class Affinity(_K8s):
    node_affinity: NodeAffinity | None = None
    pod_affinity: PodAffinity | None = None
    pod_anti_affinity: PodAffinity | None = None


class TopologySpreadConstraint(_K8s):
    max_skew: int = Field(..., ge=1, le=10000)
    topology_key: str = Field(..., max_length=317, pattern=LABEL_KEY)
    when_unsatisfiable: Literal["DoNotSchedule", "ScheduleAnyway"]
    label_selector: LabelSelector | None = None
    min_domains: int | None = Field(None, ge=1, le=10000)


# --- the whole ---------------------------------------------------------------------------------

class PodCustomization(_K8s):
    env: list[EnvVar] = Field(default_factory=list, max_length=256)
    env_from: list[EnvFrom] = Field(default_factory=list, max_length=64)
    volumes: list[Volume] = Field(default_factory=list, max_length=64)
    volume_mounts: list[VolumeMount] = Field(default_factory=list, max_length=64)
    image_pull_secrets: list[str] = Field(default_factory=list, max_length=16, description="Secret names.")
    service_account_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN)
    automount_service_account_token: bool = Field(
        False, description="Mount the service account's token (e.g. for workload identity); off unless asked.")
    affinity: Affinity | None = None
    topology_spread_constraints: list[TopologySpreadConstraint] = Field(default_factory=list, max_length=16)
    scheduler_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    annotations: dict[str, str] = Field(default_factory=dict, max_length=64)

    @model_validator(mode="after")
    def _consistent(self) -> PodCustomization:
        for var in self.env:
            if var.name in OPERATOR_ENV or var.name.startswith("KUBETRAIN_"):
                raise ValueError(f"env: {var.name} is set by the operator")
        volumes = [v.name for v in self.volumes]
        if len(set(volumes)) != len(volumes):
            raise ValueError("volumes: a name appears twice")
        if taken := OPERATOR_VOLUMES.intersection(volumes):
            raise ValueError(f"volumes: {sorted(taken)[0]!r} is the operator's own volume")
        for mount in self.volume_mounts:
            if mount.name not in volumes:
                raise ValueError(f"volumeMounts: {mount.name!r} names no volume in spec.pod.volumes")
        paths = [m.mount_path.rstrip("/") or "/" for m in self.volume_mounts]
        if len(set(paths)) != len(paths):
            raise ValueError("volumeMounts: a mountPath appears twice")
        for path in paths:
            if path in OPERATOR_PATHS or path == "/" or any(mine.startswith(path + "/") for mine in OPERATOR_PATHS):
                raise ValueError(f"volumeMounts: {path} is (or holds) a path the operator mounts")
        for name in self.image_pull_secrets:
            if not re.match(DNS_SUBDOMAIN, name) or len(name) > 253:
                raise ValueError(f"imagePullSecrets: {name!r} is not a Secret name")
        for key in [*self.labels, *self.annotations]:
            if key.startswith(OPERATOR_PREFIX):
                raise ValueError(f"labels and annotations: {key} is the operator's own")
        for key, value in self.labels.items():
            if not re.match(LABEL_KEY, key) or not re.match(LABEL_VALUE, value):
                raise ValueError(f"labels: {key}={value!r} is not a valid label")
        for key, value in self.annotations.items():
            if not re.match(LABEL_KEY, key) or len(value) > 65536:
                raise ValueError(f"annotations: {key!r} is not a valid annotation")
        return self
