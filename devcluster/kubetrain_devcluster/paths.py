"""Kubernetes API paths, parsed (kmock's own parser fails on ``/api/v1/namespaces``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import kmock


@dataclasses.dataclass(frozen=True)
class ApiPath:
    """A parsed ``/api/...`` or ``/apis/...`` path; ``plural`` is None for discovery paths."""

    group: str | None
    version: str | None
    namespace: str | None = None
    plural: str | None = None
    name: str | None = None
    subresource: str | None = None
    watch: bool = False  # the deprecated /watch/ prefix

    @property
    def resource(self) -> kmock.resource | None:
        """kmock's resource (keywords: kmock reads ``resource("", "v1")`` as a plural named v1)."""
        if self.group is None:
            return None
        return kmock.resource(group=self.group, version=self.version, plural=self.plural)


def parse_api_path(path: str) -> ApiPath | None:
    """Parse a Kubernetes API path; None for anything else.

    kmock's own parser fails on ``/api/v1/namespaces`` and reads ``/api/v1/namespaces/x`` as a
    namespace without a resource, hence this one. ``namespaces/{name}/status`` and ``.../finalize``
    are subresources of a namespace, not resources in it.
    """
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["api"]:
        group, rest = "", parts[1:]
    elif parts[:1] == ["apis"]:
        group, rest = (parts[1] if len(parts) > 1 else None), parts[2:]
    else:
        return None
    version, rest = (rest[0] if rest else None), rest[1:]
    watch = rest[:1] == ["watch"]
    rest = rest[1:] if watch else rest
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces" and not (len(rest) == 3 and rest[2] in ("status", "finalize")):
        namespace, rest = rest[1], rest[2:]
    padded = rest + [None, None, None]
    subresource = "/".join(rest[2:]) or None
    return ApiPath(group, version, namespace, padded[0], padded[1], subresource, watch)



def guess_action(method: str, api: ApiPath | None, params: Mapping[str, str]) -> kmock.action | None:
    """The kmock action, so that kmock DSL filters such as ``emu['list pods']`` still read requests."""
    if api is None or api.plural is None:
        return None
    if method == "GET":
        if params.get("watch") in ("true", "1"):
            return kmock.action.WATCH
        return kmock.action.FETCH if api.name else kmock.action.LIST
    if method == "POST" and api.name is None:
        return kmock.action.CREATE
    if method in ("PATCH", "PUT") and api.name:
        return kmock.action.UPDATE
    if method == "DELETE" and api.name:
        return kmock.action.DELETE
    return None
