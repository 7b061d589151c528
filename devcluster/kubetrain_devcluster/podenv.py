"""A container's environment: $(VAR) expansion and env/envFrom from Secrets, ConfigMaps and the pod."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from .machine import parse_quantity
from .objects import HOST_IP, Pod, meta, pod_key, spec



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
