"""Tables for kubectl (printer columns) and the minimal OpenAPI v3 that keeps kubectl's validation server-side."""

from __future__ import annotations

import datetime
import json
import re
import uuid
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import aiohttp.web
import kmock

from kubetrain.contracts import parse_timestamp

from .errors import api_error
from .objects import Obj, meta
from .resources import Target


_DEFAULT_COLUMNS: dict[str, list[Obj]] = {
    "pods": [{"name": "Status", "type": "string", "jsonPath": ".status.phase"},
             {"name": "Node", "type": "string", "jsonPath": ".spec.nodeName", "priority": 1}],
    "namespaces": [{"name": "Status", "type": "string", "jsonPath": ".status.phase"}],
    "customresourcedefinitions": [{"name": "Created At", "type": "string",
                                   "jsonPath": ".metadata.creationTimestamp"}],
}


def _cell(obj: Obj, column: Obj) -> Any:
    value = _json_path(obj, column["jsonPath"])
    if column["jsonPath"] == ".status.phase" and meta(obj).get("deletionTimestamp"):
        return "Terminating"
    if column.get("type") == "date":
        return _age(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return value  # kubectl prints None as <none>



def header(request: kmock.Request, name: str) -> str:
    """A request header, case-insensitively (kmock keeps them in a plain dict)."""
    raw = request._raw_request
    return raw.headers.get(name, "") if raw is not None else ""


def wants_table(request: kmock.Request) -> bool:
    return "as=Table" in header(request, "Accept")



def _hash_gv(resources: list[kmock.resource]) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, ",".join(sorted(map(str, resources)))).hex[:16]



def _age(timestamp: str | None) -> str:
    """kubectl's short age (``5s``, ``3m``, ``2h``, ``4d``) for Table cells."""
    if not timestamp:
        return "<unknown>"
    try:
        start = parse_timestamp(timestamp)
    except ValueError:
        return "<unknown>"
    seconds = int((datetime.datetime.now(datetime.UTC) - start).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _json_path(obj: Any, path: str) -> Any:
    """The simple JSONPath of printer columns: ``.status.phase``, ``.spec.items[0].x``."""
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            index = int(part[1:-1])
            obj = obj[index] if isinstance(obj, list) and index < len(obj) else None
        else:
            obj = obj.get(part) if isinstance(obj, Mapping) else None
    return obj



class TablesMixin:
    """Tables and OpenAPI documents of the emulator (reads ``self.resources`` and ``self._columns``)."""

    def _table(self, t: Target, items: list[Obj], rv: str) -> Obj:
        """A ``meta.k8s.io/v1`` Table, as kubectl asks for: printer columns or name/age."""
        columns = self._columns.get(t.res) or _DEFAULT_COLUMNS.get(t.res.plural or "", [])
        defs = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}]
        defs += [{"name": c["name"], "type": c.get("type", "string"), "format": "", "description": "",
                  "priority": c.get("priority", 0)} for c in columns]
        if not any(c["jsonPath"] == ".metadata.creationTimestamp" for c in columns):
            defs.append({"name": "Age", "type": "date", "format": "", "description": "", "priority": 0})
            columns = [*columns, {"jsonPath": ".metadata.creationTimestamp", "type": "date"}]
        rows = [{"cells": [meta(obj).get("name")] + [_cell(obj, c) for c in columns],
                 "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                            "metadata": meta(obj)}} for obj in items]
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv},
                "columnDefinitions": defs, "rows": rows}

    def _serve_openapi(self, path: str) -> aiohttp.web.StreamResponse:
        """Enough OpenAPI v3 for kubectl to see that the server validates fields itself."""
        by_gv: dict[str, list[kmock.resource]] = defaultdict(list)
        for res in self.resources:
            by_gv[f"api/{res.version}" if not res.group else f"apis/{res.group}/{res.version}"].append(res)
        if path.rstrip("/") == "/openapi/v3":
            paths = {gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash={_hash_gv(resources)}"}
                     for gv, resources in by_gv.items()}
            return aiohttp.web.json_response({"paths": paths})
        gv = path.removeprefix("/openapi/v3/").strip("/")
        if gv not in by_gv:
            raise api_error(404, "the server could not find the requested resource")
        return aiohttp.web.json_response(self._openapi_document(by_gv[gv]))

    def _openapi_document(self, resources: list[kmock.resource]) -> Obj:
        paths: Obj = {}
        for res in resources:
            info = self.resources[res]
            prefix = f"/api/{res.version}" if not res.group else f"/apis/{res.group}/{res.version}"
            scope = "/namespaces/{namespace}" if info.namespaced else ""
            gvk = {"group": res.group, "version": res.version, "kind": info.kind}
            patch = {"x-kubernetes-group-version-kind": gvk, "parameters": [
                {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": {"description": "OK"}}}
            paths[f"{prefix}{scope}/{res.plural}/{{name}}"] = {"patch": patch}
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"}, "paths": paths,
                "components": {"schemas": {}}}

    # -- faults --------------------------------------------------------------------------------
