"""The resources the dev cluster's API server serves, and what a request addresses."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import kmock

from .objects import DEFAULT_GRACE_SECONDS, Key, Obj, now_rfc3339


ALL_VERBS = frozenset({"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"})
CRD_RESOURCE = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
NAMESPACES = kmock.resource("", "v1", "namespaces")
PODS = kmock.resource("", "v1", "pods")


def _info(kind: str, *, namespaced: bool = True, subresources: Iterable[str] = (),
          shortnames: Iterable[str] = (), categories: Iterable[str] = ()) -> kmock.ResourceInfo:
    return kmock.ResourceInfo(kind=kind, singular=kind.lower(), namespaced=namespaced, verbs=ALL_VERBS,
                              subresources=subresources, shortnames=shortnames, categories=categories)


def builtin_resources() -> dict[str, kmock.ResourceInfo]:
    """The built-in resources the operator, the executor and kubectl use (a fresh dict each call)."""
    return {
        "v1/namespaces": _info("Namespace", namespaced=False, subresources={"status"}, shortnames={"ns"}),
        "v1/nodes": _info("Node", namespaced=False, subresources={"status"}, shortnames={"no"}),
        "v1/pods": _info("Pod", subresources={"status", "eviction", "log"}, shortnames={"po"},
                         categories={"all"}),
        "v1/services": _info("Service", subresources={"status"}, shortnames={"svc"}, categories={"all"}),
        "v1/configmaps": _info("ConfigMap", shortnames={"cm"}),
        "v1/secrets": _info("Secret"),
        "v1/events": _info("Event", shortnames={"ev"}),
        "v1/serviceaccounts": _info("ServiceAccount", shortnames={"sa"}),
        "events.k8s.io/v1/events": _info("Event"),
        "apiextensions.k8s.io/v1/customresourcedefinitions": _info(
            "CustomResourceDefinition", namespaced=False, subresources={"status"}, shortnames={"crd", "crds"}),
        "coordination.k8s.io/v1/leases": _info("Lease"),
        "networking.k8s.io/v1/networkpolicies": _info("NetworkPolicy", shortnames={"netpol"}),  # stored, not enforced
    }



@dataclasses.dataclass(frozen=True)
class Target:
    """What a resource request addresses, after checking that the resource is served."""

    res: kmock.resource
    info: kmock.ResourceInfo
    namespace: str | None
    name: str | None
    subresource: str | None

    @property
    def key(self) -> Key:
        assert self.name is not None
        return (self.res, self.namespace, self.name)

    @property
    def has_status(self) -> bool:
        return "status" in self.info.subresources




def api_version(res: kmock.resource) -> str:
    return f"{res.group}/{res.version}" if res.group else str(res.version)



def apply_defaults(res: kmock.resource, obj: Obj) -> None:
    """The few defaults of a real server that the operator and the executor read."""
    if res == PODS:
        spec = obj.setdefault("spec", {})
        spec.setdefault("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS)
        spec.setdefault("restartPolicy", "Always")
        obj["status"] = {"phase": "Pending"}
    elif res == NAMESPACES:
        obj["status"] = {"phase": "Active"}
    elif res == CRD_RESOURCE:
        names = (obj.get("spec") or {}).get("names") or {}
        conditions = [{"type": t, "status": "True", "reason": r, "message": "", "lastTransitionTime": now_rfc3339()}
                      for t, r in (("NamesAccepted", "NoConflicts"), ("Established", "InitialNamesAccepted"))]
        stored = [v["name"] for v in (obj.get("spec") or {}).get("versions") or [] if v.get("storage")]
        obj["status"] = {"conditions": conditions, "acceptedNames": names, "storedVersions": stored}
