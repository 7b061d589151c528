"""Objects as the dev cluster's API server and executor handle them: plain JSON dicts, read safely."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import kmock

from kubetrain.contracts import timestamp

Obj = dict[str, Any]
Pod = Obj
Key = tuple[kmock.resource, str | None, str]  # (resource, namespace, name)
Selector = Callable[[Obj], bool]

HOST_IP = "127.0.0.1"  # every simulated node's address
DEFAULT_GRACE_SECONDS = 30  # a pod's terminationGracePeriodSeconds when it sets none
TERMINAL_PHASES = ("Succeeded", "Failed")  # of a pod


def now_rfc3339(offset_seconds: float = 0) -> str:
    """Now (plus an offset) as Kubernetes writes timestamps."""
    return timestamp(time.time() + offset_seconds)


def meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


def spec(obj: Mapping[str, Any]) -> dict[str, Any]:
    return obj.get("spec") or {}


def status(obj: Mapping[str, Any]) -> dict[str, Any]:
    return obj.get("status") or {}


def set_condition(obj: Obj, condition: Obj) -> None:
    """Replace (or add) the status condition of this type."""
    current = obj.setdefault("status", {})
    others = [c for c in current.get("conditions") or [] if c.get("type") != condition["type"]]
    current["conditions"] = [*others, condition]


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
