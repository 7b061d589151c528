"""The local pod executor: a kubelet + scheduler stand-in that runs Pod objects as local processes.

No machine here runs Kubernetes. The dev cluster is an API server (`kubetrain.devcluster.apiserver`)
plus this executor: it watches Pods over HTTP, binds them to fake nodes, runs each pod's container
command as a local process (the "image" is this Python environment), and writes pod status back,
so that the real operator's pods really run (torchrun processes) on one machine.

What it does, in the order a pod sees it:

1. Nodes. On start it registers N Node objects `local-0`, `local-1`, ... (labels
   `kubernetes.io/hostname`, `kubernetes.io/os=linux` and extra labels from the options; condition
   Ready=True; capacity cpu/memory of this machine; address 127.0.0.1). An existing Node of that name
   (a previous executor's) is taken over: its labels and status are patched.
2. Scheduling. A pod with no `spec.nodeName`, no deletionTimestamp, not finished and with the default
   scheduler is bound (merge PATCH of `spec.nodeName`) round-robin to one of our live, schedulable
   nodes whose labels match `spec.nodeSelector` and the required node affinity (matchExpressions
   In/NotIn/Exists/DoesNotExist/Gt/Lt, matchFields on metadata.name). If none matches, the pod stays
   Pending with condition PodScheduled=False reason Unschedulable and a message; pending pods are
   re-checked every `schedule_interval` seconds. A pre-set `spec.nodeName` naming one of our nodes is
   honoured; pods bound to other node names are ignored.
3. Sandbox. When a pod is bound to one of our nodes the executor gives it a unique loopback address
   127.A.B.C (never 127.0.0.x; all of 127/8 routes to loopback on Linux) and a directory
   `<state_dir>/pods/<namespace>/<name>-<uid[:8]>/`, and writes phase Pending with podIP, hostIP
   127.0.0.1 and startTime (like a kubelet, the IP exists before the container starts: two pods that
   name each other can both resolve).
4. Container config, retried until it works (every `config_retry_interval` s):
   - Env: `value`, `valueFrom` secretKeyRef / configMapKeyRef / fieldRef / resourceFieldRef, and
     `envFrom` (with prefix), `optional` honoured. `$(VAR)` in env values, command and args is expanded
     by Kubernetes' rules (`$$` escapes, unknown names stay literal). A missing required Secret,
     ConfigMap or key leaves the pod Pending with waiting reason CreateContainerConfigError.
   - Volumes, the stand-in for the container filesystem, materialized under the pod directory:
     emptyDir, configMap and secret (all keys, or `items`; secret data base64-decoded), downwardAPI;
     hostPath is this machine's path; persistentVolumeClaim is `<state_dir>/pvc/<namespace>/<claim>`
     (shared and kept across pods). A missing required volume source leaves the pod waiting with
     reason ContainerCreating.
   - Paths: each volumeMount's mountPath (with subPath), the terminationMessagePath (default
     /dev/termination-log) and the `image_roots` option (e.g. {"/opt/kubetrain": "/work/main"}) map to
     local paths. Absolute paths that start with one of these prefixes (longest first, on a path
     boundary, anywhere in the string: `--config=/etc/cfg/x` and `open('/etc/cfg/x')` both work) are
     rewritten in command, args, env values and workingDir.
   - DNS stand-in: there is no cluster DNS, so names `<hostname>.<subdomain>[.<ns>[.svc[.cluster.local]]]`
     in command, args and env values are replaced by the podIP of the pod (not finished, not deleting)
     with that spec.hostname and spec.subdomain in that namespace (the short forms mean the pod's own
     namespace). If that pod has no IP yet, or a `.svc`/`.svc.cluster.local` name names no pod yet,
     the start waits (retry every `dns_retry_interval` s, waiting reason ContainerCreating).
5. Process. Command `python`/`python3` means this executor's interpreter (`python` option); other
   commands are looked up on PATH. Env = PATH, LANG, HOME and TMPDIR (inside the pod directory),
   HOSTNAME, then `extra_env`, then the container env (the container wins). cwd = workingDir
   (rewritten) or the pod directory. It runs in a new session (its own process group) so signals
   reach torchrun's children; stdout+stderr go to `<log_dir>/<namespace>/<name>_<uid>.log`. Status:
   phase Running, conditions PodScheduled/Initialized/ContainersReady/Ready = True, containerStatuses
   with state.running and containerID `local://<pid>`.
6. Exit: phase Succeeded (0) or Failed; state.terminated {exitCode, reason Completed/Error, signal
   (killed by a signal: exitCode = 128 + signal), message, startedAt, finishedAt}. The message is the
   termination message file (first 4096 bytes) or, with FallbackToLogsOnError and an empty file on
   failure, the log's last 80 lines (at most 2048 bytes). When the main process exits, whatever is
   left of its process group is SIGKILLed (a container's processes die with it).
7. Deletion: a pod with metadata.deletionTimestamp gets SIGTERM on its process group, then SIGKILL
   after deletionGracePeriodSeconds; its terminated status is written; then the executor DELETEs it
   with gracePeriodSeconds=0 and preconditions.uid (a newer pod of the same name is never removed).
   A pod deleted before its process started, or after it finished, is removed at once. A DELETED
   event while the process runs (force delete) SIGKILLs the group at once.
8. Node loss: deleting one of our Node objects simulates losing that machine: its pods' groups are
   SIGKILLed, each pod gets DisruptionTarget=True reason DeletionByTaintManager, Ready=False,
   status.reason NodeLost, phase Failed, and is removed. The node is not re-registered; pods bound to
   it later get the same treatment (as the pod garbage collector does for pods on missing nodes).
9. Shutdown (SIGTERM/SIGINT or `stop()`/cancel): every process group gets SIGTERM, then SIGKILL after
   `shutdown_grace`; the pods are left Failed with status.reason Terminated and DisruptionTarget reason
   TerminationByKubelet (like graceful node shutdown) and our nodes are marked Ready=False. On start,
   unfinished pods on our node names that already have a podIP/startTime (a previous executor ran
   them; their processes are gone) are marked Failed with status.reason NodeRestarted and removed.

Deliberate differences from a real kubelet (and scheduler):
- Only `spec.containers[0]` runs; more containers and initContainers are ignored (logged warning).
- restartPolicy is always Never: OnFailure and Always are treated as Never (logged warning);
  restartCount stays 0. No probes, no lifecycle hooks, no activeDeadlineSeconds, no resource limits
  enforced, no image pulls (`image` is only echoed into containerStatuses), no taints/tolerations,
  no pod (anti-)affinity, no preemption, no capacity accounting in scheduling.
- All pods share this machine's network namespace: a pod IP is a loopback alias, so a process that
  binds 0.0.0.0 or 127.0.0.1 on a port collides with other pods doing the same; bind the pod IP.
- Only the DNS names above resolve, and only by text substitution before the process starts (a
  name built at run time is not resolved). No Service DNS, no env vars for Services, no
  KUBERNETES_SERVICE_HOST, no service account token.
- Files outside mounts/image roots are this machine's files (no container root filesystem); a
  workingDir that is not mapped and does not exist is created under `<pod dir>/rootfs`. Volume
  contents are written once (configMap/secret updates are not propagated); projected and other
  volume kinds become empty directories (logged warning); file modes are not applied.
- Pod status is written with strategic merge patches to `/status` carrying only our own condition
  types (conditions merge by type, so an eviction's DisruptionTarget is kept); containerStatuses are
  replaced whole. Status writes carry no uid precondition (a PATCH has none): they are skipped when
  the watch cache shows a different uid under the pod's name, which leaves a tiny window in which a
  pod re-created under the same name could receive a stale write.
- Binding is a PATCH of spec.nodeName (no Binding subresource); Node heartbeats/leases are not sent.
- Every executor schedules onto its own nodes only. Several executors on one API server work (each
  runs the pods bound to its nodes), but a pod that fits only another executor's nodes is briefly
  marked Unschedulable by the others until it is bound.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime
import itertools
import json
import logging
import math
import os
import platform
import random
import re
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger("kubetrain.devcluster.executor")

HOST_IP = "127.0.0.1"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
MAX_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
DEFAULT_GRACE_SECONDS = 30
TERMINAL_PHASES = ("Succeeded", "Failed")
READY_LINE = "kubetrain executor ready ({n} nodes)"

Pod = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# small accessors and time


def now_iso() -> str:
    """RFC 3339 UTC with seconds, as Kubernetes writes timestamps."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


def spec(obj: Mapping[str, Any]) -> dict[str, Any]:
    return obj.get("spec") or {}


def status(obj: Mapping[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def pod_key(pod: Mapping[str, Any]) -> tuple[str, str]:
    return meta(pod).get("namespace") or "default", meta(pod).get("name", "")


def is_terminal(pod: Mapping[str, Any]) -> bool:
    return status(pod).get("phase") in TERMINAL_PHASES


def is_deleting(pod: Mapping[str, Any]) -> bool:
    return bool(meta(pod).get("deletionTimestamp"))


def deletion_grace(pod: Mapping[str, Any]) -> float:
    """The grace the deleter asked for; the pod's own terminationGracePeriodSeconds otherwise."""
    value = meta(pod).get("deletionGracePeriodSeconds")
    if value is None:
        value = spec(pod).get("terminationGracePeriodSeconds")
    return float(DEFAULT_GRACE_SECONDS if value is None else value)


# --------------------------------------------------------------------------------------------------
# quantities (resourceFieldRef, node capacity)

_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?")
_SUFFIXES: dict[str, Decimal] = {
    "": Decimal(1), "m": Decimal("0.001"), "k": Decimal(10) ** 3, "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9, "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes resource quantity ("500m", "2Gi", "1e3") as an exact number."""
    match = _QUANTITY.fullmatch(str(value).strip())
    if match is None:
        raise ValueError(f"invalid quantity {value!r}")
    return Decimal(match.group(1)) * _SUFFIXES[match.group(2) or ""]


def machine_arch() -> str:
    """This machine's architecture as Kubernetes spells it (amd64, arm64, ...)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine or "amd64")


def node_system_info() -> dict[str, str]:
    """Node status.nodeInfo; every field is filled, as typed clients require them all."""
    def read(path: str, default: str) -> str:
        try:
            return Path(path).read_text().strip() or default
        except OSError:
            return default

    machine_id = read("/etc/machine-id", "0" * 32)
    return {"architecture": machine_arch(), "operatingSystem": "linux", "osImage": platform.platform(),
            "kernelVersion": platform.release(), "bootID": read("/proc/sys/kernel/random/boot_id", ""),
            "machineID": machine_id, "systemUUID": machine_id, "kubeletVersion": "v1.30.0-kubetrain",
            "kubeProxyVersion": "", "containerRuntimeVersion": "local://1"}


def machine_memory_bytes() -> int:
    """Total memory of this machine (node capacity)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# --------------------------------------------------------------------------------------------------
# $(VAR) expansion, exactly as k8s.io/kubernetes/third_party/forked/golang/expansion


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Expand `$(NAME)` from env; `$$` is a literal `$`; unknown or unterminated references stay as written."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            following = text[cursor + 1]
            advance = 1
            if following == "$":
                out.append("$")
            elif following == "(":
                close = text.find(")", cursor + 2)
                if close == -1:
                    out.append("$(")
                else:
                    name = text[cursor + 2:close]
                    out.append(env[name] if name in env else f"$({name})")
                    advance = close - cursor
            else:
                out.append("$" + following)
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    out.append(text[checkpoint:])
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# node selection


def match_expression(expr: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """One NodeSelectorRequirement (In, NotIn, Exists, DoesNotExist, Gt, Lt) against node labels."""
    key, op, values = expr.get("key", ""), expr.get("operator", ""), list(expr.get("values") or [])
    present = key in labels
    if op == "In":
        return present and labels[key] in values
    if op == "NotIn":
        return not present or labels[key] not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt") and present and len(values) == 1:
        try:
            have, want = int(labels[key]), int(values[0])
        except ValueError:
            return False
        return have > want if op == "Gt" else have < want
    return False


def node_selector_term_matches(term: Mapping[str, Any], node_name: str, labels: Mapping[str, str]) -> bool:
    """A NodeSelectorTerm: all matchExpressions (labels) and matchFields (metadata.name) must hold."""
    fields = {"metadata.name": node_name}
    return (all(match_expression(e, labels) for e in term.get("matchExpressions") or [])
            and all(match_expression(e, fields) for e in term.get("matchFields") or []))


def pod_fits_node(pod_spec: Mapping[str, Any], node_name: str, labels: Mapping[str, str]) -> bool:
    """nodeSelector (every key equal) and required node affinity (any term) both hold for the node."""
    selector = pod_spec.get("nodeSelector") or {}
    if any(labels.get(k) != v for k, v in selector.items()):
        return False
    required = (((pod_spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = required.get("nodeSelectorTerms")
    if terms:
        return any(node_selector_term_matches(t, node_name, labels) for t in terms)
    return True


# --------------------------------------------------------------------------------------------------
# path rewriting


class PathRewriter:
    """Rewrites container paths (mounts, termination file, image roots) to local paths inside strings.

    A prefix matches on a path boundary: it must not continue a longer path or word before it
    (except after `file://`) and must be followed by `/`, the end, or a character that cannot be part
    of a file name. Longest prefixes are tried first, in one pass, so output is never rewritten twice.
    """

    def __init__(self, mapping: Mapping[str, str | Path]):
        cleaned = {_clean_path(p): str(local) for p, local in mapping.items() if p.startswith("/")}
        cleaned.pop("/", None)
        self.mapping = cleaned
        prefixes = sorted(cleaned, key=len, reverse=True)
        self._pattern = re.compile(
            r"(?:(?<=://)|(?<![\w.~/-]))(" + "|".join(map(re.escape, prefixes)) + r")(?=/|$|[^\w.~-])"
        ) if prefixes else None

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: self.mapping[m.group(1)], text)


def _clean_path(path: str) -> str:
    """`/a//b/` -> `/a/b`, without resolving anything on disk."""
    parts = [p for p in path.split("/") if p and p != "."]
    return "/" + "/".join(parts)


# --------------------------------------------------------------------------------------------------
# DNS stand-in

DnsKey = tuple[str, str, str]  # namespace, hostname, subdomain
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_CANDIDATE = re.compile(rf"(?<![\w.-]){_LABEL}(?:\.{_LABEL})+(?![\w-]|\.[a-z0-9])", re.IGNORECASE)


class DnsPending(Exception):
    """Names that will resolve once their pod exists and has an IP; the container start waits."""

    def __init__(self, names: Iterable[str]):
        self.names = sorted(set(names))
        super().__init__("waiting for DNS names: " + ", ".join(self.names))


def parse_pod_dns_name(name: str, namespace: str) -> tuple[DnsKey, bool] | None:
    """(namespace, hostname, subdomain) that a name could mean, and whether it is an explicit `.svc` name.

    `h.s` and `h.s.ns` are ambiguous (they also look like file or module names), so they are only
    replaced when such a pod exists; `h.s.ns.svc` and `h.s.ns.svc.cluster.local` are cluster names.
    """
    labels = name.lower().split(".")
    if len(labels) == 2:
        return (namespace, labels[0], labels[1]), False
    if len(labels) == 3:
        return (labels[2], labels[0], labels[1]), False
    if len(labels) == 4 and labels[3] == "svc":
        return (labels[2], labels[0], labels[1]), True
    if len(labels) == 6 and labels[3:] == ["svc", "cluster", "local"]:
        return (labels[2], labels[0], labels[1]), True
    return None


def substitute_dns(text: str, namespace: str, table: Mapping[DnsKey, str | None]) -> tuple[str, list[str]]:
    """Replace pod DNS names by pod IPs; also return the names that must wait (pod without IP, or absent `.svc` name)."""
    pending: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match.group(0)
        parsed = parse_pod_dns_name(name, namespace)
        if parsed is None:
            return name
        key, explicit = parsed
        if key in table:
            ip = table[key]
            if ip:
                return ip
            pending.append(name)
        elif explicit:
            pending.append(name)
        return name

    return _DNS_CANDIDATE.sub(replace, text), pending


def dns_table(pods: Iterable[Pod], ips: Mapping[str, str]) -> dict[DnsKey, str | None]:
    """(namespace, hostname, subdomain) -> IP (None: the pod exists but has no IP yet), from live pods.

    `ips` (uid -> IP) are the executor's own assignments, known before status reaches the cache.
    Finished and deleting pods are left out, as a headless Service drops their endpoints.
    """
    table: dict[DnsKey, str | None] = {}
    for pod in pods:
        hostname, subdomain = spec(pod).get("hostname"), spec(pod).get("subdomain")
        if not hostname or not subdomain or is_terminal(pod) or is_deleting(pod):
            continue
        key = (pod_key(pod)[0], hostname.lower(), subdomain.lower())
        ip = ips.get(meta(pod).get("uid", "")) or status(pod).get("podIP")
        table[key] = table.get(key) or ip
    return table


# --------------------------------------------------------------------------------------------------
# env, from Secrets, ConfigMaps and the pod itself

SourceKey = tuple[str, str]  # ("secret" | "configmap", name)
Sources = Mapping[SourceKey, Mapping[str, bytes] | None]  # None: the object does not exist


class ConfigError(Exception):
    """The container cannot be created yet (missing Secret/ConfigMap/key); retried like kubelet does."""

    def __init__(self, message: str, reason: str = "CreateContainerConfigError"):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclasses.dataclass(frozen=True)
class PodFacts:
    """What the executor knows about a pod beyond its manifest: written to status only later."""

    pod_ip: str
    node_name: str
    host_ip: str = HOST_IP
    node_cpu: int = os.cpu_count() or 1
    node_memory: int = 0


def referenced_sources(pod: Pod, container: Mapping[str, Any]) -> set[SourceKey]:
    """Every Secret/ConfigMap the container's env and the pod's volumes read."""
    refs: set[SourceKey] = set()
    for var in container.get("env") or []:
        value_from = var.get("valueFrom") or {}
        if "secretKeyRef" in value_from:
            refs.add(("secret", value_from["secretKeyRef"].get("name", "")))
        if "configMapKeyRef" in value_from:
            refs.add(("configmap", value_from["configMapKeyRef"].get("name", "")))
    for source in container.get("envFrom") or []:
        if "secretRef" in source:
            refs.add(("secret", source["secretRef"].get("name", "")))
        if "configMapRef" in source:
            refs.add(("configmap", source["configMapRef"].get("name", "")))
    for volume in spec(pod).get("volumes") or []:
        if "secret" in volume:
            refs.add(("secret", volume["secret"].get("secretName", "")))
        if "configMap" in volume:
            refs.add(("configmap", volume["configMap"].get("name", "")))
    return refs


def source_data(kind: str, obj: Mapping[str, Any]) -> dict[str, bytes]:
    """Key -> bytes of a Secret (base64 `data`, plain `stringData`) or ConfigMap (`data`, base64 `binaryData`)."""
    out: dict[str, bytes] = {}
    if kind == "secret":
        out.update({k: base64.b64decode(v or "") for k, v in (obj.get("data") or {}).items()})
        out.update({k: (v or "").encode() for k, v in (obj.get("stringData") or {}).items()})
    else:
        out.update({k: base64.b64decode(v or "") for k, v in (obj.get("binaryData") or {}).items()})
        out.update({k: (v or "").encode() for k, v in (obj.get("data") or {}).items()})
    return out


def _kind_word(kind: str) -> str:
    return "secret" if kind == "secret" else "configmap"


def lookup_key(sources: Sources, kind: str, ref: Mapping[str, Any], namespace: str) -> bytes | None:
    """A key of a Secret/ConfigMap; None when absent and optional; ConfigError when absent and required."""
    name, key, optional = ref.get("name", ""), ref.get("key", ""), bool(ref.get("optional"))
    data = sources.get((kind, name))
    if data is None:
        if optional:
            return None
        raise ConfigError(f'{_kind_word(kind)} "{name}" not found')
    if key not in data:
        if optional:
            return None
        label = "Secret" if kind == "secret" else "ConfigMap"
        raise ConfigError(f"couldn't find key {key} in {label} {namespace}/{name}")
    return data[key]


_FIELD_KEY = re.compile(r"metadata\.(labels|annotations)\['(.*)'\]")


def field_ref_value(pod: Pod, path: str, facts: PodFacts) -> str:
    """The downward API fields kubelet supports for env (and whole labels/annotations for volumes)."""
    m = meta(pod)
    simple = {
        "metadata.name": m.get("name", ""),
        "metadata.namespace": m.get("namespace") or "default",
        "metadata.uid": m.get("uid", ""),
        "spec.nodeName": facts.node_name,
        "spec.serviceAccountName": spec(pod).get("serviceAccountName") or "default",
        "status.podIP": facts.pod_ip,
        "status.podIPs": facts.pod_ip,
        "status.hostIP": facts.host_ip,
        "status.hostIPs": facts.host_ip,
    }
    if path in simple:
        return simple[path]
    keyed = _FIELD_KEY.fullmatch(path)
    if keyed:
        return str((m.get(keyed.group(1)) or {}).get(keyed.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((m.get(path.split(".")[1]) or {}).items())
        return "\n".join(f"{k}={json.dumps(str(v))}" for k, v in items)
    raise ConfigError(f"unsupported fieldPath {path!r}")


def resource_field_value(container: Mapping[str, Any], ref: Mapping[str, Any], facts: PodFacts) -> str:
    """limits/requests of cpu/memory/ephemeral-storage divided by the divisor, rounded up (best effort).

    Unset limits are the node's capacity; unset requests are the limits if set, else 0, as kubelet does.
    """
    resource = ref.get("resource", "")
    kind, _, name = resource.partition(".")
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(name)
    if raw is None and kind == "requests":
        raw = (resources.get("limits") or {}).get(name)
        if raw is None:
            raw = 0
    if raw is None:
        raw = facts.node_cpu if name == "cpu" else facts.node_memory
    divisor = parse_quantity(ref.get("divisor") or "1")
    if divisor == 0:
        divisor = Decimal(1)
    return str(math.ceil(parse_quantity(raw) / divisor))


def env_var_value(var: Mapping[str, Any], pod: Pod, container: Mapping[str, Any], sources: Sources,
                  facts: PodFacts, env: Mapping[str, str]) -> str | None:
    """One `env[]` entry's value (None: optional and absent, so the variable is not set)."""
    if "valueFrom" not in var:
        return expand_vars(str(var.get("value", "")), env)
    value_from = var["valueFrom"] or {}
    namespace = pod_key(pod)[0]
    if "secretKeyRef" in value_from:
        data = lookup_key(sources, "secret", value_from["secretKeyRef"], namespace)
    elif "configMapKeyRef" in value_from:
        data = lookup_key(sources, "configmap", value_from["configMapKeyRef"], namespace)
    elif "fieldRef" in value_from:
        return field_ref_value(pod, value_from["fieldRef"].get("fieldPath", ""), facts)
    elif "resourceFieldRef" in value_from:
        return resource_field_value(container, value_from["resourceFieldRef"], facts)
    else:
        raise ConfigError(f"unsupported valueFrom in env {var.get('name')!r}")
    return None if data is None else data.decode("utf-8", "replace")


def env_from_values(source: Mapping[str, Any], sources: Sources) -> dict[str, str]:
    """One `envFrom[]` entry: every key of the Secret/ConfigMap, with the prefix; optional honoured."""
    kind, ref = ("secret", source["secretRef"]) if "secretRef" in source else ("configmap", source.get("configMapRef") or {})
    data = sources.get((kind, ref.get("name", "")))
    if data is None:
        if ref.get("optional"):
            return {}
        raise ConfigError(f'{_kind_word(kind)} "{ref.get("name", "")}" not found')
    prefix = source.get("prefix") or ""
    return {prefix + k: v.decode("utf-8", "replace") for k, v in data.items() if "=" not in k}


def resolve_env(pod: Pod, container: Mapping[str, Any], sources: Sources, facts: PodFacts) -> dict[str, str]:
    """The container's env in kubelet's order: envFrom first, then env (each value may use earlier ones)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        env.update(env_from_values(source, sources))
    for var in container.get("env") or []:
        value = env_var_value(var, pod, container, sources, facts, env)
        if value is not None:
            env[var.get("name", "")] = value
    return env


# --------------------------------------------------------------------------------------------------
# volumes and the launch


def safe_relative(path: str) -> Path:
    """A volume item path must stay inside its volume."""
    rel = Path(path)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ConfigError(f"invalid volume item path {path!r}")
    return rel


def write_key_files(target: Path, data: Mapping[str, bytes] | None, items: list[Mapping[str, Any]] | None,
                    optional: bool, what: str) -> None:
    """A configMap/secret volume: all keys as files, or only `items` under their paths."""
    target.mkdir(parents=True, exist_ok=True)
    if data is None:
        if optional:
            return
        raise ConfigError(f"MountVolume.SetUp failed: {what} not found", reason="ContainerCreating")
    chosen = [(i.get("key", ""), i.get("path") or i.get("key", "")) for i in items] if items else [(k, k) for k in data]
    for key, rel in chosen:
        if key not in data:
            if optional:
                continue
            raise ConfigError(f"MountVolume.SetUp failed: key {key} not in {what}", reason="ContainerCreating")
        path = target / safe_relative(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[key])


def materialize_volume(volume: Mapping[str, Any], pod: Pod, pod_dir: Path, pvc_root: Path,
                       sources: Sources, facts: PodFacts) -> Path:
    """Create one volume's local directory and content; return where it lives."""
    name = volume.get("name", "")
    target = pod_dir / "volumes" / name
    namespace = pod_key(pod)[0]
    if "hostPath" in volume:
        return Path(volume["hostPath"].get("path", "/"))
    if "persistentVolumeClaim" in volume:
        claim = pvc_root / namespace / volume["persistentVolumeClaim"].get("claimName", name)
        claim.mkdir(parents=True, exist_ok=True)
        return claim
    if "configMap" in volume:
        cm = volume["configMap"]
        write_key_files(target, sources.get(("configmap", cm.get("name", ""))), cm.get("items"),
                        bool(cm.get("optional")), f'configmap "{cm.get("name", "")}"')
    elif "secret" in volume:
        sec = volume["secret"]
        write_key_files(target, sources.get(("secret", sec.get("secretName", ""))), sec.get("items"),
                        bool(sec.get("optional")), f'secret "{sec.get("secretName", "")}"')
    elif "downwardAPI" in volume:
        target.mkdir(parents=True, exist_ok=True)
        for item in volume["downwardAPI"].get("items") or []:
            if "fieldRef" in item:
                path = target / safe_relative(item.get("path", ""))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(field_ref_value(pod, item["fieldRef"].get("fieldPath", ""), facts))
    else:
        if "emptyDir" not in volume:
            log.warning("pod %s/%s: volume %r of an unsupported kind is an empty directory", *pod_key(pod), name)
        target.mkdir(parents=True, exist_ok=True)
    return target


def materialize_volumes(pod: Pod, pod_dir: Path, pvc_root: Path, sources: Sources, facts: PodFacts) -> dict[str, Path]:
    """All of the pod's volumes, by name."""
    return {v.get("name", ""): materialize_volume(v, pod, pod_dir, pvc_root, sources, facts)
            for v in spec(pod).get("volumes") or []}


def mount_paths(container: Mapping[str, Any], volumes: Mapping[str, Path]) -> dict[str, Path]:
    """mountPath -> local path, for each volumeMount (with subPath)."""
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        name = mount.get("name", "")
        if name not in volumes:
            raise ConfigError(f"volumeMount {name!r} names no volume of the pod")
        local = volumes[name]
        if mount.get("subPath"):
            local = local / safe_relative(mount["subPath"])
        mounts[mount.get("mountPath", "")] = local
    return mounts


@dataclasses.dataclass
class Launch:
    """Everything needed to start the container process."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    termination_file: Path


@dataclasses.dataclass(frozen=True)
class LaunchContext:
    """Executor-wide inputs of a launch (same for all pods)."""

    image_roots: Mapping[str, str]
    extra_env: Mapping[str, str]
    python: str
    base_env: Mapping[str, str]


def base_env() -> dict[str, str]:
    """The few host variables a container gets (no host env leaks into pods otherwise)."""
    return {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8")}


def build_launch(pod: Pod, container: Mapping[str, Any], container_env: Mapping[str, str],
                 mounts: Mapping[str, Path], pod_dir: Path, dns: Mapping[DnsKey, str | None],
                 ctx: LaunchContext) -> Launch:
    """argv, env and cwd with $(VAR) expanded, DNS names substituted and container paths rewritten.

    Raises DnsPending when a name's pod has no IP yet.
    """
    namespace = pod_key(pod)[0]
    termination_path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
    termination_file = pod_dir / "termination-log"
    rewrite = PathRewriter({**ctx.image_roots, **{k: str(v) for k, v in mounts.items()},
                            termination_path: str(termination_file)})
    pending: list[str] = []

    def finish(text: str) -> str:
        text, waiting = substitute_dns(text, namespace, dns)
        pending.extend(waiting)
        return rewrite(text)

    raw = [*(container.get("command") or []), *(container.get("args") or [])]
    argv = [finish(expand_vars(str(a), container_env)) for a in raw]
    env = {k: finish(v) for k, v in container_env.items()}
    if pending:
        raise DnsPending(pending)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = ctx.python
    home, tmp = pod_dir / "home", pod_dir / "tmp"
    full_env = {**ctx.base_env, "HOME": str(home), "TMPDIR": str(tmp),
                "HOSTNAME": spec(pod).get("hostname") or pod_key(pod)[1], **ctx.extra_env, **env}
    return Launch(argv, full_env, working_dir(container, rewrite, pod_dir), termination_file)


def working_dir(container: Mapping[str, Any], rewrite: PathRewriter, pod_dir: Path) -> Path:
    """workingDir rewritten; an unmapped one that does not exist here lives under `<pod dir>/rootfs`."""
    wanted = container.get("workingDir")
    if not wanted:
        return pod_dir
    local = Path(rewrite(wanted))
    if str(local) == wanted and not local.is_dir():
        local = pod_dir / "rootfs" / wanted.lstrip("/")
    return local


# --------------------------------------------------------------------------------------------------
# status


def condition(kind: str, value: bool, reason: str | None = None, message: str | None = None) -> dict[str, Any]:
    cond: dict[str, Any] = {"type": kind, "status": "True" if value else "False"}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


def stamp_conditions(existing: Iterable[Mapping[str, Any]], updates: Iterable[Mapping[str, Any]],
                     now: str) -> list[dict[str, Any]]:
    """The updates with lastTransitionTime, which only moves when a condition's status changes.

    Only these are sent, with a strategic merge patch (conditions merge by type), so conditions
    that others wrote (DisruptionTarget from an eviction) are never overwritten from a stale cache.
    """
    old_by_type = {c.get("type"): c for c in existing}
    stamped = []
    for update in updates:
        old = old_by_type.get(update["type"])
        same = old is not None and old.get("status") == update["status"]
        stamped.append({**update, "lastProbeTime": None,
                        "lastTransitionTime": old.get("lastTransitionTime", now) if same and old else now})
    return stamped


def merge_conditions(existing: Iterable[Mapping[str, Any]], updates: Iterable[Mapping[str, Any]],
                     now: str) -> list[dict[str, Any]]:
    """What a strategic merge of stamped updates gives: ours replace the same type, others are kept."""
    merged = {c.get("type"): dict(c) for c in existing}
    for new in stamp_conditions(existing, updates, now):
        merged[new["type"]] = new
    return list(merged.values())


def exit_code_and_signal(returncode: int) -> tuple[int, int | None]:
    """asyncio's returncode (-N when killed by signal N) as a container exit code (128 + N)."""
    if returncode < 0:
        return 128 - returncode, -returncode
    return returncode, None


def read_head(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""


def log_tail(path: Path, lines: int = FALLBACK_LOG_LINES, limit: int = FALLBACK_LOG_BYTES) -> str:
    """The last lines of a log, at most `limit` bytes (kubelet's FallbackToLogsOnError)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    tail = b"\n".join(data.splitlines()[-lines:])
    return tail[-limit:].decode("utf-8", "replace")


def termination_message(term_file: Path, log_file: Path, policy: str | None, failed: bool) -> str:
    """The termination message file, or with FallbackToLogsOnError and an empty file on failure, the log tail."""
    message = read_head(term_file, MAX_MESSAGE_BYTES)
    if not message and failed and policy == "FallbackToLogsOnError":
        message = log_tail(log_file)
    return message


def terminated_state(returncode: int, message: str, started_at: str | None, finished_at: str,
                     container_id: str | None) -> dict[str, Any]:
    code, sig = exit_code_and_signal(returncode)
    state: dict[str, Any] = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                             "startedAt": started_at, "finishedAt": finished_at}
    if sig is not None:
        state["signal"] = sig
    if message:
        state["message"] = message
    if container_id:
        state["containerID"] = container_id
    return state


def container_status(container: Mapping[str, Any], state: Mapping[str, Any], *, ready: bool = False,
                     started: bool = False, container_id: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": container.get("name", ""), "image": container.get("image", ""),
                           "imageID": "", "ready": ready, "started": started, "restartCount": 0,
                           "state": dict(state), "lastState": {}}
    if container_id:
        out["containerID"] = container_id
    return out


# --------------------------------------------------------------------------------------------------
# pod IPs


class IpAllocator:
    """Unique loopback addresses 127.A.B.C for pods (127.0.0.x is the host's).

    Each executor starts at a random 127.A.1.1 (A in 1..254), so that two dev clusters on one machine
    (a test run and a user's) do not hand out the same pod IPs.
    """

    FIRST = (127 << 24) | (1 << 16) | 1
    LAST = (127 << 24) | 0xFFFFFE

    def __init__(self, start: int | None = None) -> None:
        self._next = start if start is not None else (127 << 24) | (random.randint(1, 254) << 16) | (1 << 8) | 1
        self._used: set[str] = set()

    def allocate(self) -> str:
        for _ in range(self.LAST - self.FIRST + 1):
            value = self._next
            self._next = self.FIRST if value >= self.LAST else value + 1
            if value & 0xFF in (0, 255):
                continue
            ip = ".".join(str((value >> s) & 0xFF) for s in (24, 16, 8, 0))
            if ip not in self._used:
                self._used.add(ip)
                return ip
        raise RuntimeError("no free pod IP in 127/8")

    def release(self, ip: str | None) -> None:
        self._used.discard(ip or "")


# --------------------------------------------------------------------------------------------------
# the API client


class ApiError(Exception):
    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        message = body.get("message") if isinstance(body, dict) else str(body)[:500]
        super().__init__(f"HTTP {status}: {message}")


def load_kubeconfig(path: str | Path) -> tuple[str, str | None, ssl.SSLContext | bool | None]:
    """(server URL, bearer token, ssl) of the current context; client certificates are not supported."""
    import yaml

    config = yaml.safe_load(Path(path).read_text()) or {}
    current = config.get("current-context")
    contexts = {c["name"]: c.get("context") or {} for c in config.get("contexts") or []}
    context = contexts.get(current) or next(iter(contexts.values()), {})
    clusters = {c["name"]: c.get("cluster") or {} for c in config.get("clusters") or []}
    users = {u["name"]: u.get("user") or {} for u in config.get("users") or []}
    cluster = clusters.get(context.get("cluster")) or next(iter(clusters.values()), {})
    user = users.get(context.get("user")) or {}
    server = cluster.get("server")
    if not server:
        raise ValueError(f"{path}: no cluster server in the current context")
    ssl_option: ssl.SSLContext | bool | None = None
    if cluster.get("insecure-skip-tls-verify"):
        ssl_option = False
    elif cluster.get("certificate-authority") or cluster.get("certificate-authority-data"):
        ctx = ssl.create_default_context(cafile=cluster.get("certificate-authority"))
        if cluster.get("certificate-authority-data"):
            ctx.load_verify_locations(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        ssl_option = ctx
    return server.rstrip("/"), user.get("token"), ssl_option


class ApiClient:
    """A thin JSON-over-HTTP client for the few Kubernetes calls the executor makes."""

    def __init__(self, server: str, token: str | None = None, ssl_option: ssl.SSLContext | bool | None = None,
                 timeout: float = 30.0):
        self.server = server.rstrip("/")
        self._headers = {"Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._ssl = ssl_option
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_kubeconfig(cls, path: str | Path) -> ApiClient:
        server, token, ssl_option = load_kubeconfig(path)
        return cls(server, token, ssl_option)

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ApiClient is not open")
        return self._session

    async def request(self, method: str, path: str, body: Any = None, params: Mapping[str, str] | None = None,
                      content_type: str = "application/json", timeout: float | None = None) -> Any:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        async with self.session.request(
            method, self.server + path, data=data, params=params, headers=headers, ssl=self._ssl,
            timeout=aiohttp.ClientTimeout(total=timeout or self._timeout),
        ) as resp:
            text = await resp.text()
            try:
                payload = json.loads(text) if text else None
            except ValueError:
                payload = text
            if resp.status >= 400:
                raise ApiError(resp.status, payload)
            return payload

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET, with None for 404."""
        try:
            return await self.request("GET", path, params=params)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def merge_patch(self, path: str, body: Any, timeout: float | None = None) -> Any:
        return await self.request("PATCH", path, body, content_type="application/merge-patch+json", timeout=timeout)

    async def strategic_patch(self, path: str, body: Any, timeout: float | None = None) -> Any:
        """Strategic merge patch (built-in kinds only): e.g. status.conditions merge by type."""
        return await self.request("PATCH", path, body, content_type="application/strategic-merge-patch+json",
                                  timeout=timeout)

    async def watch(self, path: str, params: Mapping[str, str]) -> AsyncIterator[dict[str, Any]]:
        """Watch events as dicts until the server ends the stream (lines may be longer than aiohttp's limit)."""
        async with self.session.get(
            self.server + path, params={**params, "watch": "true"}, ssl=self._ssl,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None),
        ) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, await resp.text())
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
            if buffer.strip():
                yield json.loads(buffer)


def is_transient(error: BaseException) -> bool:
    """Worth retrying: the server was busy or failing, or the connection broke."""
    if isinstance(error, ApiError):
        return error.status >= 500 or error.status == 429
    return isinstance(error, (aiohttp.ClientError, asyncio.TimeoutError))


def pod_path(namespace: str, name: str, sub: str = "") -> str:
    return f"/api/v1/namespaces/{namespace}/pods/{name}{sub}"


# --------------------------------------------------------------------------------------------------
# the executor


@dataclasses.dataclass
class ExecutorOptions:
    """How the executor behaves; every field has a CLI flag or a sensible default."""

    state_dir: Path
    nodes: int = 1
    node_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    image_roots: Mapping[str, str] = dataclasses.field(default_factory=dict)
    extra_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    log_dir: Path | None = None
    python: str = sys.executable
    node_prefix: str = "local"
    shutdown_grace: float = 5.0
    schedule_interval: float = 1.0
    config_retry_interval: float = 1.0
    dns_retry_interval: float = 0.5
    watch_retry_interval: float = 0.5

    @property
    def logs(self) -> Path:
        return Path(self.log_dir) if self.log_dir else Path(self.state_dir) / "logs"

    def node_names(self) -> list[str]:
        return [f"{self.node_prefix}-{i}" for i in range(self.nodes)]


class PodRun:
    """One pod this executor runs: its sandbox, process and stop requests (kept until the pod is gone)."""

    def __init__(self, pod: Pod, node: str, ip: str, pod_dir: Path, log_file: Path):
        self.pod = pod
        self.uid: str = meta(pod).get("uid", "")
        self.namespace, self.name = pod_key(pod)
        self.node = node
        self.ip = ip
        self.pod_dir = pod_dir
        self.log_file = log_file
        self.container: dict[str, Any] = (spec(pod).get("containers") or [{}])[0]
        self.proc: asyncio.subprocess.Process | None = None
        self.container_id: str | None = None
        self.started_at: str | None = None
        self.returncode: int | None = None
        self.start_error: str | None = None
        self.termination_file: Path | None = None
        self.stop_deadline: float | None = None
        self.gone = False  # the pod object no longer exists
        self.node_lost = False
        self.shutdown = False
        self.removing = False
        self.waiting: tuple[str, str] | None = None
        self.start_time: str = status(pod).get("startTime") or now_iso()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def deletion_requested(self) -> bool:
        return is_deleting(self.pod)

    @property
    def stop_requested(self) -> bool:
        return self.stop_deadline is not None

    @property
    def active(self) -> bool:
        return self.task is not None and not self.task.done()

    def update(self, pod: Pod) -> None:
        """A newer version of the pod; a deletionTimestamp asks the process to stop within its grace."""
        self.pod = pod
        if is_deleting(pod):
            self.request_stop(deletion_grace(pod))

    def request_stop(self, grace: float) -> None:
        """Stop within `grace` seconds from now; a shorter later request wins, as with kubelet."""
        deadline = time.monotonic() + max(0.0, grace)
        self.stop_deadline = deadline if self.stop_deadline is None else min(self.stop_deadline, deadline)
        self.wake.set()

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake early when something about the pod changes."""
        self.wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.wake.wait(), seconds)

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


class PodExecutor:
    """Runs the Pods bound to its fake nodes as local processes; see the module docstring."""

    def __init__(self, api: ApiClient | str, options: ExecutorOptions):
        self.api = ApiClient(api) if isinstance(api, str) else api
        self.options = options
        self.node_names = options.node_names()
        self.ready = asyncio.Event()
        self._ctx = LaunchContext(image_roots=dict(options.image_roots), extra_env=dict(options.extra_env),
                                  python=options.python, base_env=base_env())
        self._pods: dict[str, Pod] = {}  # uid -> latest pod seen
        self._uid_by_key: dict[tuple[str, str], str] = {}
        self._runs: dict[str, PodRun] = {}
        self._nodes: dict[str, dict[str, Any]] = {}  # our live nodes, latest object
        self._lost: set[str] = set()
        self._handled: set[str] = set()  # uids given a one-shot treatment (removal, NodeRestarted, NodeLost)
        self._binding: set[str] = set()
        self._rr = itertools.count()
        self._ips = IpAllocator()
        self._memory = machine_memory_bytes()
        self._schedule_wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._pods_synced = asyncio.Event()
        self._nodes_synced = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._running = False

    # ---- lifecycle of the executor

    async def run(self) -> None:
        """Register nodes, watch pods and nodes, schedule, until stop() or cancellation; then stop all pods."""
        loops: list[asyncio.Task[None]] = []
        self._running = True
        await self.api.open()
        try:
            await self._register_nodes()
            loops = [
                asyncio.create_task(self._watch_forever(
                    "/api/v1/pods", self._on_pod_list, self._on_pod_event, self._pods_synced)),
                asyncio.create_task(self._watch_forever(
                    "/api/v1/nodes", self._on_node_list, self._on_node_event, self._nodes_synced)),
                asyncio.create_task(self._schedule_loop()),
            ]
            await self._pods_synced.wait()
            await self._nodes_synced.wait()
            self.ready.set()
            log.info("executor ready: nodes %s", ", ".join(self.node_names))
            await self._stopping.wait()
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self._shutdown()
            await self.api.close()
            self._stopped.set()

    async def stop(self) -> None:
        """Ask run() to stop every pod and return; waits for it when it is running."""
        self._stopping.set()
        if self._running:
            await self._stopped.wait()

    def request_stop(self) -> None:
        """stop() for signal handlers, which cannot await."""
        self._stopping.set()

    async def _shutdown(self) -> None:
        """SIGTERM every process group, SIGKILL after the shutdown grace; then mark our nodes NotReady."""
        for task in list(self._background):
            task.cancel()
        runs = [r for r in self._runs.values() if r.active]
        for run in runs:
            run.shutdown = True
            run.request_stop(self.options.shutdown_grace)
        tasks = [r.task for r in runs if r.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.options.shutdown_grace + 5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(self._mark_node_not_ready(n) for n in self._nodes), return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        """A fire-and-forget task that is cancelled on shutdown and whose errors are logged."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task failed", exc_info=t.exception())

        task.add_done_callback(done)

    # ---- nodes

    def _node_manifest(self, name: str) -> dict[str, Any]:
        labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": machine_arch(),
                  **self.options.node_labels}
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
                "spec": {}, "status": self._node_status(True)}

    def _node_status(self, ready: bool) -> dict[str, Any]:
        now = now_iso()
        capacity = {"cpu": str(os.cpu_count() or 1), "memory": f"{self._memory // 1024}Ki", "pods": "110"}
        reason, message = ("KubeletReady", "kubetrain executor is running") if ready else \
            ("KubeletNotReady", "kubetrain executor stopped")
        return {"capacity": capacity, "allocatable": capacity,
                "conditions": [{**condition("Ready", ready, reason, message),
                                "lastHeartbeatTime": now, "lastTransitionTime": now}],
                "addresses": [{"type": "InternalIP", "address": HOST_IP}],
                "nodeInfo": node_system_info()}

    async def _register_nodes(self, patience: float = 30.0) -> None:
        """Register every node; retried while the API server is not answering yet."""
        deadline = time.monotonic() + patience
        for name in self.node_names:
            while True:
                try:
                    await self._register_node(name)
                    break
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    if time.monotonic() > deadline:
                        raise
                    log.info("registering node %s failed (%s); retrying", name, e)
                    await asyncio.sleep(self.options.watch_retry_interval)

    async def _register_node(self, name: str) -> None:
        """Create the Node; take over an existing one of the same name (a previous executor's)."""
        manifest = self._node_manifest(name)
        try:
            await self.api.request("POST", "/api/v1/nodes", manifest)
        except ApiError as e:
            if e.status != 409:
                raise
            await self.api.merge_patch(f"/api/v1/nodes/{name}", {"metadata": {"labels": manifest["metadata"]["labels"]},
                                                                 "spec": {"unschedulable": None}})
        # status through its subresource even after a create: servers may drop status on create
        node = await self.api.merge_patch(f"/api/v1/nodes/{name}/status", {"status": manifest["status"]})
        self._nodes[name] = node or manifest

    async def _mark_node_not_ready(self, name: str) -> None:
        with contextlib.suppress(Exception):
            await self.api.merge_patch(f"/api/v1/nodes/{name}/status", {"status": self._node_status(False)}, timeout=2)

    async def _on_node_list(self, items: list[dict[str, Any]]) -> None:
        names = {meta(n).get("name") for n in items}
        for name in list(self._nodes):
            if name not in names:
                self._node_lost(name)
        for node in items:
            await self._on_node_event("ADDED", node)

    async def _on_node_event(self, kind: str, node: dict[str, Any]) -> None:
        name = meta(node).get("name", "")
        if name not in self.node_names or name in self._lost:
            return
        if kind == "DELETED":
            self._node_lost(name)
        else:
            self._nodes[name] = node
            self._schedule_wake.set()

    def _node_lost(self, name: str) -> None:
        """Simulate losing the machine: kill its pods now, mark them NodeLost, remove them."""
        if name in self._lost:
            return
        log.warning("node %s was deleted: its pods are lost", name)
        self._lost.add(name)
        self._nodes.pop(name, None)
        for run in self._runs.values():
            if run.node == name and run.active:
                run.node_lost = True
                run.request_stop(0)
        for uid, pod in list(self._pods.items()):
            if uid not in self._runs and spec(pod).get("nodeName") == name:
                self._reconcile(pod)

    # ---- watches

    async def _watch_forever(self, path: str, on_list: Callable[[list[dict[str, Any]]], Awaitable[None]],
                             on_event: Callable[[str, dict[str, Any]], Awaitable[None]], synced: asyncio.Event) -> None:
        """List then watch, forever; any error or end of stream re-lists (so no event is missed)."""
        while True:
            try:
                listing = await self.api.request("GET", path)
                await on_list(list(listing.get("items") or []))
                synced.set()
                params = {"allowWatchBookmarks": "true"}
                version = meta(listing).get("resourceVersion")
                if version:
                    params["resourceVersion"] = str(version)
                async with contextlib.aclosing(self.api.watch(path, params)) as events:
                    async for event in events:
                        kind, obj = event.get("type", ""), event.get("object") or {}
                        if kind == "ERROR":
                            log.info("watch %s: %s; re-listing", path, obj.get("message"))
                            break
                        if kind in ("ADDED", "MODIFIED", "DELETED"):
                            await on_event(kind, obj)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the watch must survive any server hiccup
                log.info("watch %s failed (%s: %s); retrying", path, type(e).__name__, e)
            await asyncio.sleep(self.options.watch_retry_interval)

    async def _on_pod_list(self, items: list[Pod]) -> None:
        uids = {meta(p).get("uid", "") for p in items}
        for uid, pod in list(self._pods.items()):
            if uid not in uids:
                await self._on_pod_event("DELETED", pod)
        for pod in items:
            await self._on_pod_event("ADDED", pod)

    async def _on_pod_event(self, kind: str, pod: Pod) -> None:
        uid = meta(pod).get("uid", "")
        key = pod_key(pod)
        if kind == "DELETED":
            self._forget_pod(uid, key)
            return
        self._pods[uid] = pod
        self._uid_by_key[key] = uid
        self._reconcile(pod)

    def _forget_pod(self, uid: str, key: tuple[str, str]) -> None:
        """The pod object is gone: a still running process is killed at once (force delete)."""
        self._pods.pop(uid, None)
        if self._uid_by_key.get(key) == uid:
            del self._uid_by_key[key]
        run = self._runs.pop(uid, None)
        if run is not None and run.active:
            log.info("pod %s/%s was removed while running: killing it", run.namespace, run.name)
            run.gone = True
            run.request_stop(0)
        self._handled.discard(uid)
        self._schedule_wake.set()  # DNS waits and unschedulable pods may change

    def _wake_waiting_runs(self) -> None:
        for run in self._runs.values():
            if run.active and run.proc is None:
                run.wake.set()

    # ---- reconcile: what to do with a pod we see

    def _reconcile(self, pod: Pod) -> None:
        """Decide what the pod needs from us; never blocks (work goes to tasks)."""
        uid = meta(pod).get("uid", "")
        node = spec(pod).get("nodeName")
        run = self._runs.get(uid)
        if uid in self._binding:
            return
        if run is not None:
            run.update(pod)
            if not run.active and is_deleting(pod) and not run.removing:
                run.removing = True
                self._spawn(self._remove(run.namespace, run.name, uid))
            return
        if not node:
            if not is_terminal(pod) and not is_deleting(pod):
                self._schedule_wake.set()
            return
        if node not in self.node_names or uid in self._handled:
            return
        self._wake_waiting_runs()  # a pod with a hostname may have appeared
        if is_terminal(pod):
            if is_deleting(pod):
                self._handled.add(uid)
                self._spawn(self._remove(*pod_key(pod), uid))
        elif node in self._lost:
            self._handled.add(uid)
            message = f"Node {node} which was running pod {pod_key(pod)[1]} is unresponsive"
            self._spawn(self._fail_and_remove(pod, "NodeLost", message, lost=True))
        elif is_deleting(pod):
            self._handled.add(uid)
            self._spawn(self._remove(*pod_key(pod), uid))
        elif status(pod).get("podIP") or status(pod).get("startTime"):
            self._handled.add(uid)
            message = f"the executor of node {node} restarted; the pod's process is gone"
            self._spawn(self._fail_and_remove(pod, "NodeRestarted", message))
        else:
            self._start_run(pod, node)

    def _start_run(self, pod: Pod, node: str) -> None:
        namespace, name = pod_key(pod)
        uid = meta(pod).get("uid", "")
        pod_dir = Path(self.options.state_dir) / "pods" / namespace / f"{name}-{uid[:8]}"
        log_file = self.options.logs / namespace / f"{name}_{uid}.log"
        run = PodRun(pod, node, self._ips.allocate(), pod_dir, log_file)
        self._runs[uid] = run
        run.task = asyncio.create_task(self._run_pod(run))
        self._wake_waiting_runs()

    # ---- scheduling

    async def _schedule_loop(self) -> None:
        while True:
            self._schedule_wake.clear()
            try:
                await self._schedule_pending()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("scheduling failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._schedule_wake.wait(), self.options.schedule_interval)

    async def _schedule_pending(self) -> None:
        for uid, pod in list(self._pods.items()):
            if self._pods.get(uid) is not pod or not self._wants_scheduling(pod):
                continue
            node = self._pick_node(pod)
            if node is None:
                await self._mark_unschedulable(pod)
            else:
                await self._bind(pod, node)

    @staticmethod
    def _wants_scheduling(pod: Pod) -> bool:
        return (not spec(pod).get("nodeName") and not is_deleting(pod) and not is_terminal(pod)
                and spec(pod).get("schedulerName", "default-scheduler") in (None, "default-scheduler"))

    def _pick_node(self, pod: Pod) -> str | None:
        """Round-robin over our live, schedulable nodes that fit the pod."""
        fitting = [name for name in self.node_names if name in self._nodes
                   and not spec(self._nodes[name]).get("unschedulable")
                   and pod_fits_node(spec(pod), name, meta(self._nodes[name]).get("labels") or {})]
        if not fitting:
            return None
        return fitting[next(self._rr) % len(fitting)]

    async def _bind(self, pod: Pod, node: str) -> None:
        """PATCH spec.nodeName, then status Pending + PodScheduled; the pod is reconciled only after both."""
        namespace, name = pod_key(pod)
        uid = meta(pod).get("uid", "")
        self._binding.add(uid)
        try:
            try:
                bound = await self.api.merge_patch(pod_path(namespace, name), {"spec": {"nodeName": node}})
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                if not (isinstance(e, ApiError) and e.status in (404, 409)):
                    log.warning("binding pod %s/%s failed (%s); the next round retries", namespace, name, e)
                return
            log.info("pod %s/%s bound to %s", namespace, name, node)
            conditions = stamp_conditions(status(pod).get("conditions") or [], [condition("PodScheduled", True)], now_iso())
            try:
                await self._patch_pod_status(namespace, name, uid, {"phase": "Pending", "conditions": conditions})
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                log.warning("pod %s/%s: status write failed: %s", namespace, name, e)
        finally:
            self._binding.discard(uid)
        if uid in self._pods:  # always, once bound: its watch events were ignored while binding
            latest = self._pods[uid]
            if not spec(latest).get("nodeName"):
                latest = bound
                self._pods[uid] = bound
            self._reconcile(latest)

    async def _mark_unschedulable(self, pod: Pod) -> None:
        """PodScheduled=False/Unschedulable, written only when it changes."""
        total = len(self.node_names) - len(self._lost)
        message = (f"0/{total} nodes are available: {total} node(s) didn't match Pod's node affinity/selector."
                   if total else "0/0 nodes are available: every node of the executor was lost.")
        current = {c.get("type"): c for c in status(pod).get("conditions") or []}.get("PodScheduled") or {}
        if current.get("reason") == "Unschedulable" and current.get("message") == message:
            return
        conditions = stamp_conditions(status(pod).get("conditions") or [],
                                      [condition("PodScheduled", False, "Unschedulable", message)], now_iso())
        namespace, name = pod_key(pod)
        with contextlib.suppress(ApiError):
            # no phase: with several executors on one server, another one may have bound it meanwhile
            await self._patch_pod_status(namespace, name, meta(pod).get("uid", ""), {"conditions": conditions})

    # ---- status and removal

    async def _patch_pod_status(self, namespace: str, name: str, uid: str, body: dict[str, Any],
                                attempts: int = 5, timeout: float | None = None) -> Pod | None:
        """Patch /status, unless the name now belongs to a newer pod; None when the pod is gone.

        Transient failures (5xx, 429, connection errors) are retried with a short backoff.
        """
        for attempt in range(attempts):
            current = self._uid_by_key.get((namespace, name))
            if current is not None and current != uid:
                return None
            try:
                return await self.api.strategic_patch(pod_path(namespace, name, "/status"), {"status": body}, timeout)
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                if isinstance(e, ApiError) and e.status == 404:
                    return None
                if not is_transient(e) or attempt + 1 == attempts:
                    raise
            await asyncio.sleep(0.2 * (attempt + 1))
        return None

    async def _write_status(self, run: PodRun, body: dict[str, Any], our_conditions: list[dict[str, Any]],
                            attempts: int = 5, timeout: float | None = None) -> None:
        """Write a run's status; conditions written by others (DisruptionTarget) are kept by the strategic merge."""
        if run.gone:
            return
        current = self._pods.get(run.uid, run.pod)
        body = {**body, "conditions": stamp_conditions(status(current).get("conditions") or [], our_conditions, now_iso())}
        try:
            await self._patch_pod_status(run.namespace, run.name, run.uid, body, attempts, timeout)
        except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as e:
            log.warning("pod %s/%s: status write failed: %s", run.namespace, run.name, e)

    async def _remove(self, namespace: str, name: str, uid: str) -> None:
        """DELETE with grace 0 and the uid as precondition: never removes a newer pod of that name."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        for attempt in range(5):
            try:
                await self.api.request("DELETE", pod_path(namespace, name), body)
                log.info("pod %s/%s removed", namespace, name)
                return
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                if isinstance(e, ApiError) and e.status in (404, 409):
                    return  # gone already, or the name belongs to a newer pod
                log.warning("removing pod %s/%s failed: %s", namespace, name, e)
                if not is_transient(e):
                    return
            await asyncio.sleep(0.2 * (attempt + 1))

    async def _fail_and_remove(self, pod: Pod, reason: str, message: str, lost: bool = False,
                               container_statuses: list[dict[str, Any]] | None = None) -> None:
        """A pod whose process is not ours (previous executor) or whose node was lost: Failed, then removed."""
        namespace, name = pod_key(pod)
        uid = meta(pod).get("uid", "")
        container = (spec(pod).get("containers") or [{}])[0]
        updates = [condition("Ready", False, "PodFailed"), condition("ContainersReady", False, "PodFailed")]
        if lost:
            updates.append(condition("DisruptionTarget", True, "DeletionByTaintManager",
                                     "Taint manager: deleting due to NoExecute taint"))
        body: dict[str, Any] = {
            "phase": "Failed", "reason": reason, "message": message,
            "conditions": stamp_conditions(status(pod).get("conditions") or [], updates, now_iso()),
        }
        if container_statuses:
            body["containerStatuses"] = container_statuses
        elif status(pod).get("containerStatuses"):
            unknown = {"exitCode": 137, "reason": "ContainerStatusUnknown",
                       "message": "The container could not be located when the pod was terminated",
                       "finishedAt": now_iso()}
            body["containerStatuses"] = [container_status(container, {"terminated": unknown})]
        with contextlib.suppress(ApiError, aiohttp.ClientError, asyncio.TimeoutError):
            await self._patch_pod_status(namespace, name, uid, body)
        await self._remove(namespace, name, uid)

    # ---- one pod, from sandbox to removal

    async def _run_pod(self, run: PodRun) -> None:
        try:
            await self._start_sandbox(run)
            launch = await self._prepare_launch(run)
            if launch is not None and await self._start_process(run, launch):
                await self._supervise(run)
            await self._report_end(run)
        except asyncio.CancelledError:
            run.signal_group(signal.SIGKILL)
            raise
        except Exception:  # noqa: BLE001 - a bug here must not kill the executor
            log.exception("pod %s/%s: executor error", run.namespace, run.name)
            run.signal_group(signal.SIGKILL)
        finally:
            self._ips.release(run.ip)

    async def _start_sandbox(self, run: PodRun) -> None:
        """The pod directory and IP; status Pending with podIP (kubelet sets the IP before containers start)."""
        for sub in ("home", "tmp", "volumes"):
            (run.pod_dir / sub).mkdir(parents=True, exist_ok=True)
        extra = [c.get("name") for c in (spec(run.pod).get("containers") or [])[1:]]
        if extra or spec(run.pod).get("initContainers"):
            log.warning("pod %s/%s: only container %r runs (ignored: %s)", run.namespace, run.name,
                        run.container.get("name"), extra + [c.get("name") for c in spec(run.pod).get("initContainers") or []])
        if spec(run.pod).get("restartPolicy", "Always") != "Never":
            log.warning("pod %s/%s: restartPolicy %s is treated as Never", run.namespace, run.name,
                        spec(run.pod).get("restartPolicy", "Always"))
        log.info("pod %s/%s on %s gets IP %s", run.namespace, run.name, run.node, run.ip)
        await self._write_status(run, self._pending_status(run, {"reason": "ContainerCreating"}),
                                 self._not_ready_conditions())

    def _pending_status(self, run: PodRun, waiting: Mapping[str, str]) -> dict[str, Any]:
        return {"phase": "Pending", "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}], "podIP": run.ip,
                "podIPs": [{"ip": run.ip}], "startTime": run.start_time,
                "containerStatuses": [container_status(run.container, {"waiting": dict(waiting)})]}

    @staticmethod
    def _not_ready_conditions() -> list[dict[str, Any]]:
        return [condition("PodScheduled", True), condition("Initialized", True),
                condition("ContainersReady", False, "ContainersNotReady", "containers with unready status"),
                condition("Ready", False, "ContainersNotReady", "containers with unready status")]

    async def _prepare_launch(self, run: PodRun) -> Launch | None:
        """Resolve env, volumes and DNS names, retrying until they resolve; None when stopped first."""
        while not run.stop_requested:
            try:
                return await self._try_launch(run)
            except ConfigError as e:
                await self._report_waiting(run, e.reason, e.message)
                delay = self.options.config_retry_interval
            except DnsPending as e:
                await self._report_waiting(run, "ContainerCreating", str(e))
                delay = self.options.dns_retry_interval
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                log.info("pod %s/%s: reading its config failed (%s); retrying", run.namespace, run.name, e)
                delay = self.options.config_retry_interval
            await run.sleep(delay)
        return None

    async def _try_launch(self, run: PodRun) -> Launch:
        sources = await self._fetch_sources(run)
        facts = PodFacts(pod_ip=run.ip, node_name=run.node, node_memory=self._memory)
        pvc_root = Path(self.options.state_dir) / "pvc"
        volumes = materialize_volumes(run.pod, run.pod_dir, pvc_root, sources, facts)
        mounts = mount_paths(run.container, volumes)
        env = resolve_env(run.pod, run.container, sources, facts)
        ips = {uid: r.ip for uid, r in self._runs.items() if r.active}
        return build_launch(run.pod, run.container, env, mounts, run.pod_dir, dns_table(self._pods.values(), ips), self._ctx)

    async def _fetch_sources(self, run: PodRun) -> dict[SourceKey, dict[str, bytes] | None]:
        """The Secrets/ConfigMaps the pod reads, fetched now (kubelet reads them at container start too)."""
        out: dict[SourceKey, dict[str, bytes] | None] = {}
        for kind, name in sorted(referenced_sources(run.pod, run.container)):
            plural = "secrets" if kind == "secret" else "configmaps"
            obj = await self.api.get(f"/api/v1/namespaces/{run.namespace}/{plural}/{name}") if name else None
            out[(kind, name)] = None if obj is None else source_data(kind, obj)
        return out

    async def _report_waiting(self, run: PodRun, reason: str, message: str) -> None:
        if run.waiting == (reason, message):
            return
        run.waiting = (reason, message)
        log.info("pod %s/%s waits: %s: %s", run.namespace, run.name, reason, message)
        await self._write_status(run, self._pending_status(run, {"reason": reason, "message": message}),
                                 self._not_ready_conditions())

    async def _start_process(self, run: PodRun, launch: Launch) -> bool:
        """Spawn the container process in its own session; a spawn error is a StartError (exit 128)."""
        if run.stop_requested:
            return False
        if not launch.argv:
            run.start_error = "no command specified (the local image has no entrypoint)"
            return False
        run.termination_file = launch.termination_file
        launch.termination_file.write_bytes(b"")
        for path in (launch.cwd, Path(launch.env.get("TMPDIR", run.pod_dir)), run.log_file.parent):
            path.mkdir(parents=True, exist_ok=True)
        run.started_at = now_iso()
        with open(run.log_file, "ab") as out:
            try:
                run.proc = await asyncio.create_subprocess_exec(
                    *launch.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                    env=launch.env, cwd=str(launch.cwd), start_new_session=True)
            except OSError as e:
                run.start_error = f"failed to start {launch.argv[0]!r}: {e}"
                out.write(f"{run.start_error}\n".encode())
                log.warning("pod %s/%s: %s", run.namespace, run.name, run.start_error)
                return False
        run.container_id = f"local://{run.proc.pid}"
        log.info("pod %s/%s started: pid %d: %s", run.namespace, run.name, run.proc.pid, " ".join(launch.argv)[:300])
        running = container_status(run.container, {"running": {"startedAt": run.started_at}}, ready=True,
                                   started=True, container_id=run.container_id)
        await self._write_status(run, {"phase": "Running", "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}],
                                       "podIP": run.ip, "podIPs": [{"ip": run.ip}],
                                       "startTime": run.start_time,
                                       "containerStatuses": [running]},
                                 [condition("PodScheduled", True), condition("Initialized", True),
                                  condition("ContainersReady", True), condition("Ready", True)])
        return True

    async def _supervise(self, run: PodRun) -> None:
        """Wait for the exit; on a stop request SIGTERM the group, SIGKILL it at the deadline."""
        assert run.proc is not None
        exited = asyncio.ensure_future(run.proc.wait())
        term_sent = kill_sent = False
        try:
            while not exited.done():
                run.wake.clear()
                now = time.monotonic()
                if run.stop_deadline is not None and not kill_sent:
                    if now >= run.stop_deadline:
                        run.signal_group(signal.SIGKILL)
                        kill_sent = term_sent = True
                    elif not term_sent:
                        run.signal_group(signal.SIGTERM)
                        term_sent = True
                timeout = None if run.stop_deadline is None or kill_sent else max(0.0, run.stop_deadline - now)
                woken = asyncio.ensure_future(run.wake.wait())
                await asyncio.wait({exited, woken}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
        finally:
            run.signal_group(signal.SIGKILL)  # the rest of the group dies with the main process
            if not exited.done():
                exited.cancel()
        run.returncode = run.proc.returncode
        log.info("pod %s/%s exited with %s", run.namespace, run.name, run.returncode)

    async def _report_end(self, run: PodRun) -> None:
        """The final status for why the run ended, then removal when the pod is being deleted or its node is lost."""
        if run.gone:
            return
        if run.node_lost:
            await self._fail_and_remove(
                self._pods.get(run.uid, run.pod), "NodeLost",
                f"Node {run.node} which was running pod {run.name} is unresponsive", lost=True,
                container_statuses=self._final_container_status(run).get("containerStatuses"))
            return
        if run.proc is None and run.start_error is None:
            if run.deletion_requested:
                await self._remove(run.namespace, run.name, run.uid)
            return  # stopped before it started (deletion, or executor shutdown)
        body = {"phase": "Succeeded" if run.returncode == 0 else "Failed", **self._final_container_status(run)}
        if run.shutdown:
            body.update(phase="Failed", reason="Terminated",
                        message="Pod was terminated in response to imminent node shutdown.")
        conditions = [condition("ContainersReady", False, "PodCompleted" if run.returncode == 0 else "PodFailed"),
                      condition("Ready", False, "PodCompleted" if run.returncode == 0 else "PodFailed")]
        if run.shutdown:
            conditions.append(condition("DisruptionTarget", True, "TerminationByKubelet",
                                        "Pod was terminated in response to imminent node shutdown."))
        if run.shutdown:
            await self._write_status(run, body, conditions, attempts=1, timeout=2)
        else:
            await self._write_status(run, body, conditions)
        if run.deletion_requested and not run.shutdown:
            run.removing = True
            await self._remove(run.namespace, run.name, run.uid)

    def _final_container_status(self, run: PodRun) -> dict[str, Any]:
        """containerStatuses with state.terminated (or StartError when the process never started)."""
        finished = now_iso()
        if run.start_error is not None:
            state = {"exitCode": 128, "reason": "StartError", "message": run.start_error,
                     "startedAt": run.started_at, "finishedAt": finished}
        elif run.returncode is not None:
            failed = run.returncode != 0
            message = termination_message(run.termination_file or run.pod_dir / "termination-log", run.log_file,
                                          run.container.get("terminationMessagePolicy"), failed)
            state = terminated_state(run.returncode, message, run.started_at, finished, run.container_id)
        else:
            return {}
        return {"containerStatuses": [container_status(run.container, {"terminated": state},
                                                       container_id=run.container_id)]}


# --------------------------------------------------------------------------------------------------
# command line


def parse_pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    """`k=v` flags as a dict (the first `=` splits)."""
    out: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kubetrain.devcluster.executor",
                                     description="Run the dev cluster's Pods as local processes (a kubelet stand-in).")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--kubeconfig", help="kubeconfig of the API server (current context)")
    target.add_argument("--api", help="API server URL, e.g. http://127.0.0.1:8001")
    parser.add_argument("--state-dir", required=True, type=Path, help="pod directories, volumes, logs")
    parser.add_argument("--nodes", type=int, default=1, help="how many Node objects to register (local-0..)")
    parser.add_argument("--node-prefix", default="local", help="node names are <prefix>-0, <prefix>-1, ...")
    parser.add_argument("--node-label", action="append", metavar="K=V", help="extra label on every node")
    parser.add_argument("--image-root", action="append", metavar="IMAGE_PATH=LOCAL_DIR",
                        help="map an image path to a local directory, e.g. /opt/kubetrain=/work/main")
    parser.add_argument("--env", action="append", metavar="K=V", help="extra env var for every pod")
    parser.add_argument("--log-dir", type=Path, help="pod logs (default <state-dir>/logs)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for `python` commands")
    parser.add_argument("--shutdown-grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL on exit")
    parser.add_argument("--log-level", default="INFO")
    return parser


def options_from_args(args: argparse.Namespace) -> ExecutorOptions:
    return ExecutorOptions(
        state_dir=args.state_dir, nodes=args.nodes, node_labels=parse_pairs(args.node_label, "--node-label"),
        image_roots=parse_pairs(args.image_root, "--image-root"), extra_env=parse_pairs(args.env, "--env"),
        log_dir=args.log_dir, python=args.python, shutdown_grace=args.shutdown_grace, node_prefix=args.node_prefix,
    )


async def main_async(args: argparse.Namespace) -> int:
    api = ApiClient.from_kubeconfig(args.kubeconfig) if args.kubeconfig else ApiClient(args.api)
    executor = PodExecutor(api, options_from_args(args))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, executor.request_stop)
    running = asyncio.create_task(executor.run())
    ready = asyncio.create_task(executor.ready.wait())
    await asyncio.wait({running, ready}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
        print(READY_LINE.format(n=len(executor.node_names)), flush=True)
    else:
        ready.cancel()
    await running
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
