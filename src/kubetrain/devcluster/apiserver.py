"""A Kubernetes API server for the dev cluster and the tests, built on kmock.

No real cluster can run here, so the operator (kopf), the pod executor, kubectl and the kubernetes
Python client all talk HTTP to this server. It is a thin subclass of ``kmock.KubernetesEmulator``:
kmock provides the HTTP handler, API discovery (``/api``, ``/apis``, ``/apis/{group}/{version}``
from ``emu.resources``), the object store (``emu.objects``, with each object's history, handy in
assertions), the per-resource event buses and its DSL (``emu['get /x'] << ...``, consulted for
paths that are not Kubernetes resources). Resource requests are served by this class, because kmock
0.8 stores objects as plain dicts (no metadata, 200 on create, which makes the kubernetes client
return None since it only deserializes a 201 there), and its path parser fails on
``/api/v1/namespaces``.

What this adds to kmock
-----------------------
1. Built-in resources: core v1 namespaces and nodes (cluster-scoped), pods (subresources status,
   eviction, log), services, configmaps, secrets, events, serviceaccounts; events.k8s.io/v1
   events; apiextensions.k8s.io/v1 customresourcedefinitions (cluster-scoped);
   coordination.k8s.io/v1 leases. Namespace ``default`` exists at start.
2. CustomResourceDefinitions: creating one (``kubectl apply -f crds/trainingjob.yaml``) declares
   its served versions (plural, kind, singular, shortNames, categories, scope, status subresource,
   printer columns) for discovery, kubectl and kopf, and marks it Established; deleting it removes
   its objects (ignoring their finalizers) and undeclares it. ``KubeApiEmulator.register_crd``
   does the same from Python, ``serve(crds=...)`` and ``--crd FILE`` before the server listens.
3. Object metadata like a real server: uid, resourceVersion (one global counter, bumped on every
   write, a string), creationTimestamp, generation (1, +1 when anything but metadata/status
   changes), namespace from the URL, ``generateName`` (5 random characters), 409 AlreadyExists,
   422 Invalid for a missing or non-DNS-1123 name, 404 when the namespace does not exist, 403 when
   it is terminating. Lists have ``kind: <Kind>List``, ``apiVersion`` and the current
   ``metadata.resourceVersion``. Pods get ``status.phase: Pending`` and the real defaults
   ``terminationGracePeriodSeconds: 30`` and ``restartPolicy: Always``; namespaces get
   ``status.phase: Active``. A write that changes nothing is not stored and sends no event.
4. Writes: PATCH as ``application/merge-patch+json`` (RFC 7386), ``application/json-patch+json``
   (RFC 6902, via ``jsonpatch``) and ``application/strategic-merge-patch+json`` (for built-in
   resources only, 415 on custom ones as in Kubernetes; lists merge by their key for the fields
   in ``_MERGE_KEYS``, e.g. ``status.conditions`` by type and ``containers`` by name,
   ``finalizers`` are a set, ``$patch: delete|replace`` and ``$deleteFromPrimitiveList``
   work, other ``$`` directives are dropped); PUT replaces (uid, creationTimestamp, generation and
   deletion fields are kept). A body whose ``metadata.resourceVersion`` differs from the stored one
   gets 409 Conflict. Other patch types (server-side apply included) get 415.
5. Status subresource: a write to ``/status`` changes only ``.status``; a write to the main resource
   keeps the stored ``.status`` (for resources that have the subresource).
6. ``labelSelector`` (``a=b``, ``a==b``, ``a!=b``, ``a in (x,y)``, ``a notin (x)``, ``a``, ``!a``,
   comma-joined) and ``fieldSelector`` (``=``, ``==``, ``!=`` on any dotted path, e.g.
   ``metadata.name``, ``metadata.namespace``, ``spec.nodeName``, ``status.phase``) on list, watch
   and delete-collection. A namespaced URL sees its namespace only; ``/api/v1/pods`` sees all.
7. Watch (``?watch=true``, also the old ``/watch/`` paths and a watch on a named object): without
   ``resourceVersion`` (or with ``0``) it sends ADDED for the matching objects, then live events.
   With a ``resourceVersion`` it sends only the events after it, from a window of the last
   ``event_window`` events per resource; an older one, or one newer than the server's (a client
   that outlived a server restart), gets an ERROR event with a 410 Expired Status, as from a real
   server, so that clients relist. ``timeoutSeconds`` ends the stream, and so do a client that hangs
   up and the server's shutdown. A watcher with a selector gets ADDED when an object starts
   matching and DELETED when it stops. With kubectl's Table Accept header events carry Tables.
8. Deletion: an object with finalizers gets ``deletionTimestamp`` (MODIFIED) and is removed when
   a write empties its finalizers. Pods bound to a node (``spec.nodeName``), not yet Succeeded or
   Failed, are deleted gracefully, as by a kubelet-backed server: a DELETE with a grace period > 0
   (``?gracePeriodSeconds=``, DeleteOptions ``gracePeriodSeconds``, default the pod's
   ``terminationGracePeriodSeconds``) only sets ``deletionTimestamp`` (now + grace) and
   ``deletionGracePeriodSeconds``; a DELETE with ``gracePeriodSeconds=0`` removes it (the pod
   executor does that once the process is gone). Other pods are removed at once. DeleteOptions
   ``preconditions.uid``/``resourceVersion`` give 409 on mismatch. DELETE on a collection deletes
   each match and returns the list.
9. Garbage collection (background propagation): when an object is removed, the objects whose
   ``ownerReferences`` all point to removed objects are deleted (pods gracefully), in any resource
   and namespace; ``propagationPolicy: Orphan`` skips this. Deleting a namespace marks it
   Terminating, deletes everything in it and removes it once it is empty.
10. Eviction: ``POST .../pods/{name}/eviction`` adds the status condition
    ``DisruptionTarget=True`` (reason ``EvictionByEvictionAPI``), then deletes the pod gracefully
    (with the Eviction's ``deleteOptions``); 201 with a Success Status.
11. Pod logs: ``GET .../pods/{name}/log`` returns ``<log_dir>/<namespace>/<name>_<uid>.log`` as
    text/plain (``tailLines`` supported); 404 without a ``log_dir``, 400 while the file does not
    exist yet (as a real server says for a container that has not started).
12. Errors are Kubernetes ``Status`` objects with the real codes and reasons (400 BadRequest,
    403 Forbidden, 404 NotFound, 405 MethodNotAllowed, 409 AlreadyExists/Conflict, 410 Expired,
    415 UnsupportedMediaType, 422 Invalid, 500 InternalError); create answers 201, so the kubernetes
    client returns the object.
13. Fault injection, for reliability tests: ``POST /_kubetrain/faults`` with
    ``{"status": 500, "count": 2, "methods": ["PATCH"], "pathRegex": "/pods"}`` makes the next
    ``count`` matching requests fail with that Status before they touch anything (``methods``
    and ``pathRegex``, searched in the URL path, are optional); ``"seconds": 20`` instead fails
    every matching request for that long. ``GET`` lists the armed faults and the spent ones, each
    with its ``hits``; ``DELETE`` clears them.
14. Tables for kubectl: ``kubectl get`` asks for a ``meta.k8s.io`` Table and gets one, with the
    CRD's ``additionalPrinterColumns`` (so ``kubectl get tj`` shows PHASE, NODES, STEP ...), pods
    with STATUS (Terminating while deleting) and NODE, other resources with NAME and AGE.
15. A minimal OpenAPI v3 (``/openapi/v3`` and one document per group-version, with a PATCH
    operation per resource that accepts ``fieldValidation``): kubectl then leaves validation to
    the server (which accepts any field) instead of downloading ``/openapi/v2``, so
    ``kubectl apply`` works with its default flags. ``/healthz`` and ``/readyz`` answer ``ok``;
    ``/version`` says v1.32 (kmock's k3s 1.26 would make kubectl warn about version skew).

Entry points: ``serve()`` (async context manager), ``write_kubeconfig()``,
``KubeApiEmulator.register_crd()``, ``load_crds()`` and
``python -m kubetrain.devcluster.apiserver --host H --port P [--log-dir D] [--crd FILE ...]``,
which prints ``kubetrain apiserver listening on http://H:P`` when ready and exits 0 on SIGTERM or
SIGINT.

kubectl (v1.32) commands verified against it, all with default flags plus ``--kubeconfig K``:
``apply -f crds/trainingjob.yaml``, ``apply -f examples/trainingjob.yaml`` (created, then unchanged or
configured), ``get tj``, ``get trainingjobs -o yaml``, ``get pods -l a=b``, ``get pod x`` (STATUS
Terminating while deleting), ``delete pod x --wait=false``, ``delete tj x`` (tests/test_apiserver.py
runs these); also ``get crd``, ``get ns``, ``get all``, ``get pods -A -o wide``, ``get pods -w``,
``describe tj x``, ``label pod x k=v``, ``patch tj x --type=merge -p ...``, ``run x --image=i``,
``logs x --tail=1`` (with a log_dir), ``wait --for=condition=established crd/trainingjobs.kubetrain.io``,
``delete pod x --grace-period=0 --force``, ``delete ns x``. Not supported: the kubectl commands
that send protobuf (typed generators such as ``kubectl create namespace|configmap|secret``) get
415; ``kubectl create ns x --dry-run=client -o yaml | kubectl apply -f -`` does the same in JSON.

Known limitations: no authentication or authorization (any token is accepted), no admission,
immutability or schema validation (CRD schemas are not enforced, ``fieldValidation`` is ignored,
``spec.nodeName`` may be patched directly: there is no ``binding`` subresource and no scheduler),
no defaulting beyond the fields named above, no protobuf, no server-side apply, no ``dryRun``, no
pagination (``limit`` is ignored, everything comes in one page), no ``follow`` for logs, no
PodDisruptionBudgets, no clusterIP allocation, and no conversion between versions of a CRD: each
served version is its own store. Foreground deletion is treated as background; a CRD's deletion
removes its objects at once; core Events never expire. Watch bookmarks are not sent. Removed objects
stay in ``emu.objects`` soft-deleted (kmock's way, for assertions); kmock's request log
(``emu.requests``) keeps only the last ``request_log_limit`` requests and each object's history its
last ``history_limit`` versions, so that a long-running dev cluster grows slowly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import dataclasses
import datetime
import json
import logging
import pathlib
import random
import re
import signal
import sys
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[kmock.resource, str | None, str]
Selector = Callable[[Obj], bool]

ALL_VERBS = frozenset({"create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"})
CRD_RESOURCE = kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
NAMESPACES = kmock.resource("", "v1", "namespaces")
PODS = kmock.resource("", "v1", "pods")
FAULTS_PATH = "/_kubetrain/faults"
DEFAULT_GRACE_SECONDS = 30


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
    }


# ---------------------------------------------------------------------------------------------
# Status errors


_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
            405: "MethodNotAllowed", 409: "Conflict", 410: "Gone", 415: "UnsupportedMediaType",
            422: "Invalid", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
            504: "Timeout"}


def api_error(code: int, message: str, *, reason: str | None = None, **details: Any) -> kmock.KubernetesError:
    """A Kubernetes error; kmock renders it as a ``Status`` with this code (and no traceback)."""
    return kmock.KubernetesError(status=code, reason=reason or _REASONS.get(code, "InternalError"),
                                 message=message, details=details)


def status_body(code: int, message: str = "", reason: str = "", details: Mapping[str, Any] | None = None) -> Obj:
    """A ``Status`` object; ``status`` is Success below 400, as the real server says."""
    body: Obj = {"kind": "Status", "apiVersion": "v1", "metadata": {},
                 "status": "Success" if code < 400 else "Failure", "code": code}
    if message:
        body["message"] = message
    if reason:
        body["reason"] = reason
    if details:
        body["details"] = dict(details)
    return body


def _describe(res: kmock.resource) -> str:
    """How the real server names a resource in messages: ``pods``, ``trainingjobs.kubetrain.io``."""
    return f"{res.plural}.{res.group}" if res.group else str(res.plural)


def _not_found(res: kmock.resource, name: str) -> kmock.KubernetesError:
    return api_error(404, f'{_describe(res)} "{name}" not found', name=name, group=res.group, kind=res.plural)


def _conflict(res: kmock.resource, name: str, why: str) -> kmock.KubernetesError:
    return api_error(409, f'Operation cannot be fulfilled on {_describe(res)} "{name}": {why}',
                     name=name, group=res.group, kind=res.plural)


def _invalid(kind: str, name: str, field: str, why: str) -> kmock.KubernetesError:
    return api_error(422, f'{kind} "{name}" is invalid: {field}: {why}', name=name, kind=kind,
                     causes=[{"reason": "FieldValueInvalid", "message": why, "field": field}])


# ---------------------------------------------------------------------------------------------
# Paths


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


# ---------------------------------------------------------------------------------------------
# Selectors


_SET_TERM = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ_TERM = re.compile(r"^\s*([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)\s*$")
_EXISTS_TERM = re.compile(r"^\s*(!?)\s*([\w./-]+)\s*$")


def _split_terms(text: str) -> list[str]:
    """Split a selector on the commas that are not inside ``in (...)`` parentheses."""
    terms, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    terms.append(current)
    return [t for t in terms if t.strip()]


def _label_term(term: str) -> Callable[[Mapping[str, str]], bool]:
    if m := _SET_TERM.match(term):
        key, op, values = m[1], m[2], {v.strip() for v in m[3].split(",") if v.strip()}
        if op == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if m := _EQ_TERM.match(term):
        key, op, value = m[1], m[2], m[3]
        if op == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if m := _EXISTS_TERM.match(term):
        negate, key = bool(m[1]), m[2]
        return lambda labels: (key in labels) != negate
    raise api_error(400, f"unable to parse requirement: {term!r}")


def parse_label_selector(text: str) -> Selector:
    """A predicate on objects for a ``labelSelector`` (400 if it does not parse)."""
    terms = [_label_term(t) for t in _split_terms(text)]
    return lambda obj: all(t((obj.get("metadata") or {}).get("labels") or {}) for t in terms)


def _field_value(obj: Obj, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def parse_field_selector(text: str) -> Selector:
    """A predicate on objects for a ``fieldSelector``: ``path=value``/``==``/``!=`` on dotted paths."""
    terms: list[tuple[str, bool, str]] = []
    for term in _split_terms(text):
        m = _EQ_TERM.match(term)
        if not m:
            raise api_error(400, f"invalid field selector: {term!r}")
        terms.append((m[1], m[2] != "!=", m[3]))
    return lambda obj: all((_field_value(obj, path) == value) == equal for path, equal, value in terms)


def request_selector(params: Mapping[str, str], namespace: str | None, name: str | None = None) -> Selector:
    """Everything a list/watch/delete-collection request filters on, as one predicate."""
    checks: list[Selector] = []
    if namespace is not None:
        checks.append(lambda obj: (obj.get("metadata") or {}).get("namespace") == namespace)
    if name is not None:
        checks.append(lambda obj: (obj.get("metadata") or {}).get("name") == name)
    if params.get("labelSelector"):
        checks.append(parse_label_selector(params["labelSelector"]))
    if params.get("fieldSelector"):
        checks.append(parse_field_selector(params["fieldSelector"]))
    return lambda obj: all(check(obj) for check in checks)


# ---------------------------------------------------------------------------------------------
# Patches


# List fields that a strategic merge patch merges element by element, and their merge keys
# (from the patchMergeKey tags of the Kubernetes types the operator and the executor write).
_MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name", "env": "name",
    "volumes": "name", "volumeMounts": "mountPath", "ports": "containerPort", "conditions": "type",
    "ownerReferences": "uid", "imagePullSecrets": "name", "hostAliases": "ip",
}
_SET_LISTS = {"finalizers"}  # primitive lists with patchStrategy=merge


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _strip_directives(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _strip_directives(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip_directives(v) for v in value]
    return copy.deepcopy(value)


def _merge_keyed_list(current: list[Any], patch: list[Any], key: str) -> list[Any]:
    """Merge a list of dicts by ``key``; ``{"$patch": "delete", key: k}`` removes an element."""
    if not all(isinstance(item, Mapping) and key in item for item in [*current, *patch]):
        return _strip_directives(patch)
    result = [copy.deepcopy(item) for item in current]
    for item in patch:
        index = next((i for i, old in enumerate(result) if old[key] == item[key]), None)
        if item.get("$patch") == "delete":
            result = [old for old in result if old[key] != item[key]]
        elif index is None:
            result.append(_strip_directives(item))
        else:
            result[index] = strategic_merge_patch(result[index], item)
    return result


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """A strategic merge patch, as far as the fields in ``_MERGE_KEYS`` and ``_SET_LISTS`` go.

    Like a merge patch, except that the listed list fields merge instead of being replaced (so an
    executor's status patch does not drop the DisruptionTarget condition that an eviction added).
    """
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return _strip_directives(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        old = result.get(key)
        if value is None:
            result.pop(key, None)
        elif key in _MERGE_KEYS and isinstance(value, list) and isinstance(old, list):
            result[key] = _merge_keyed_list(old, value, _MERGE_KEYS[key])
        elif key in _SET_LISTS and isinstance(value, list) and isinstance(old, list):
            result[key] = old + [v for v in value if v not in old]
        else:
            result[key] = strategic_merge_patch(old, value)
    for key, values in patch.items():
        if key.startswith("$deleteFromPrimitiveList/") and isinstance(values, list):
            field = key.split("/", 1)[1]
            result[field] = [v for v in result.get(field) or [] if v not in values]
    return result


def apply_patch(obj: Obj, content_type: str, patch: Any, *, strategic_ok: bool) -> Obj:
    """Apply a PATCH body of the given content type; 415 for unknown types, 4xx for bad bodies."""
    if content_type == "application/json-patch+json":
        if not isinstance(patch, list):
            raise api_error(400, "json patch must be a list of operations")
        try:
            return _checked_object(jsonpatch.apply_patch(obj, patch))
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, KeyError, TypeError) as e:
            raise api_error(422, f"the json patch could not be applied: {e}") from e
    if content_type == "application/strategic-merge-patch+json" and strategic_ok:
        return _checked_object(strategic_merge_patch(obj, _checked_object(patch)))
    if content_type == "application/merge-patch+json":
        return _checked_object(merge_patch(obj, _checked_object(patch)))
    raise api_error(415, "the body of the request was in an unknown format - accepted media types include: "
                         "application/json-patch+json, application/merge-patch+json"
                    + (", application/strategic-merge-patch+json" if strategic_ok else ""))


def _checked_object(body: Any) -> Obj:
    if not isinstance(body, dict):
        raise api_error(400, "the request body must be a JSON object")
    return body


# ---------------------------------------------------------------------------------------------
# Object metadata helpers


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # the real server's: no vowels, no confusables


def now_rfc3339(offset_seconds: float = 0) -> str:
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset_seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    return obj.get("metadata") or {}


def _spec_part(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What ``generation`` counts: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _ready_to_remove(res: kmock.resource, obj: Obj) -> bool:
    """Being deleted, no finalizers left, and not a pod waiting out its grace period."""
    meta = _meta(obj)
    return (res != NAMESPACES and bool(meta.get("deletionTimestamp")) and not meta.get("finalizers")
            and not meta.get("deletionGracePeriodSeconds"))


def _set_condition(obj: Obj, condition: Obj) -> None:
    status = obj.setdefault("status", {})
    others = [c for c in status.get("conditions") or [] if c.get("type") != condition["type"]]
    status["conditions"] = [*others, condition]


def _age(timestamp: str | None) -> str:
    """kubectl's short age (``5s``, ``3m``, ``2h``, ``4d``) for Table cells."""
    if not timestamp:
        return "<unknown>"
    try:
        start = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
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


# ---------------------------------------------------------------------------------------------
# Fault injection


@dataclasses.dataclass
class Fault:
    """Fail requests that match ``methods`` and ``path_regex`` with ``status``: the next ``count``
    of them, or every one for ``seconds`` (then ``count``, if given, caps them too)."""

    status: int
    count: int | None = 1
    methods: frozenset[str] = frozenset()
    path_regex: str = ""
    message: str = ""
    until: float | None = None  # time.monotonic() deadline
    hits: int = 0

    @classmethod
    def from_json(cls, body: Any) -> Fault:
        body = _checked_object(body)
        try:
            seconds = body.get("seconds")
            count = body.get("count", None if seconds is not None else 1)
            fault = cls(status=int(body["status"]), count=None if count is None else int(count),
                        methods=frozenset(m.upper() for m in body.get("methods") or ()),
                        path_regex=str(body.get("pathRegex") or ""), message=str(body.get("message") or ""),
                        until=None if seconds is None else time.monotonic() + float(seconds))
            re.compile(fault.path_regex)
        except (KeyError, TypeError, ValueError, re.error) as e:
            raise api_error(400, f"invalid fault: {e}") from e
        if not 400 <= fault.status <= 599 or (fault.count is not None and fault.count < 1):
            raise api_error(400, "invalid fault: status must be 4xx/5xx and count >= 1")
        return fault

    @property
    def spent(self) -> bool:
        return (self.count is not None and self.count <= 0) or (self.until is not None and time.monotonic() >= self.until)

    def matches(self, method: str, path: str) -> bool:
        return (not self.methods or method.upper() in self.methods) and bool(re.search(self.path_regex, path))

    def to_json(self) -> Obj:
        return {"status": self.status, "count": self.count, "methods": sorted(self.methods),
                "pathRegex": self.path_regex, "message": self.message, "hits": self.hits,
                "secondsLeft": None if self.until is None else max(0.0, round(self.until - time.monotonic(), 3))}


# ---------------------------------------------------------------------------------------------
# The emulator


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


@attrs.define(kw_only=True)
class KubeApiEmulator(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with the semantics listed in this module's docstring.

    Every write holds ``self._lock`` (kmock's) while it changes ``self.objects`` and puts its
    event on ``self._buses[resource]``, so a watcher that marks the bus under the lock misses
    nothing and sees nothing twice. Stored object dicts are never mutated in place: each write
    stores a new copy, so events and responses can share them.
    """

    log_dir: pathlib.Path | None = attrs.field(default=None, converter=lambda p: None if p is None else pathlib.Path(p))
    audit_log: pathlib.Path | None = attrs.field(default=None, converter=lambda p: None if p is None else pathlib.Path(p))
    event_window: int = 10_000
    request_log_limit: int = 1_000
    history_limit: int = 20

    _rv: int = attrs.field(default=0, init=False)
    _events: dict[kmock.resource, deque[Obj]] = attrs.field(factory=dict, init=False)
    _expired_rv: dict[kmock.resource, int] = attrs.field(factory=lambda: defaultdict(int), init=False)
    _faults: list[Fault] = attrs.field(factory=list, init=False)  # spent ones stay, so their hits stay readable
    _columns: dict[kmock.resource, list[Obj]] = attrs.field(factory=dict, init=False)
    _tasks: set[asyncio.Task[None]] = attrs.field(factory=set, init=False)
    _closing: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)

    def __attrs_post_init__(self) -> None:
        # Only the scaffold's discovery routes: the emulator's own fallbacks would store objects
        # with kmock's simpler semantics, and resource requests never reach them here anyway.
        kmock.KubernetesScaffold.__attrs_post_init__(self)
        self.fallback["get /healthz"] << b"ok"
        self.fallback["get /readyz"] << b"ok"
        for key, info in builtin_resources().items():
            self.resources[key] = info
        self._store((NAMESPACES, None, "default"), self._new_object(
            NAMESPACES, None, {"metadata": {"name": "default"}}))

    # -- kmock hooks ---------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Parse with ``parse_api_path`` (not kmock's), serve, and render every error as a Status.

        Writes are shielded: with handler cancellation on (so that a closed watch connection ends
        its handler), a client that hangs up mid-write must not leave a write half done.
        """
        try:
            request = await self._parse(raw_request)
            if self.audit_log is not None:
                self._audit(raw_request, request)
            self._requests.append(request)
            del self._requests[: -self.request_log_limit]
            if raw_request.method == "GET":
                return await self._handle(request)
            return await asyncio.shield(self._handle(request))
        except kmock.KubernetesError as e:
            return await self._render_error(e)
        except Exception as e:
            log.exception("kubetrain apiserver: %s %s failed", raw_request.method, raw_request.path)
            if self._errors:
                self._errors[-1].append(e)
            return await self._render_error(e)

    def _audit(self, raw: aiohttp.web.BaseRequest, request: kmock.Request) -> None:
        """One JSON line per resource request: who (bearer token) did which RBAC verb on what.

        The dev cluster gives each component its own token, so a test can compare what the operator
        really does with what its ClusterRole grants (there is no authorization here to do it).
        """
        res = request.resource
        if res is None or res.plural is None:
            return
        named = request.name is not None
        verb = {"GET": "get" if named else "list", "POST": "create", "PUT": "update", "PATCH": "patch",
                "DELETE": "delete" if named else "deletecollection"}.get(raw.method, raw.method.lower())
        if raw.method == "GET" and request.params.get("watch") in ("true", "1"):
            verb = "watch"
        user = raw.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        entry = {"user": user, "verb": verb, "group": res.group or "", "resource": res.plural,
                 "subresource": request.subresource or "", "namespace": request.namespace or "", "name": request.name or ""}
        with open(self.audit_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if type(exc) is kmock.KubernetesError:  # ours: real reasons and messages
            body = status_body(exc.status, exc.message or "", exc.reason or "", exc.details)
            return aiohttp.web.json_response(body, status=exc.status)
        if isinstance(exc, kmock.KubernetesError):  # kmock's discovery 404s: give them real reasons
            reason = _REASONS.get(exc.status, "InternalError")
            body = status_body(exc.status, "the server could not find the requested resource", reason)
            return aiohttp.web.json_response(body, status=exc.status)
        return aiohttp.web.json_response(status_body(500, repr(exc), "InternalError"), status=500)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        path = request.url.path
        if path.rstrip("/") == FAULTS_PATH:
            return self._serve_faults(request)
        self._check_faults(request.method, path)
        if path == "/openapi/v3" or path.startswith("/openapi/v3/"):
            return self._serve_openapi(path)
        if request.resource is not None and request.resource.plural is not None:
            return await self._serve_resource(request)
        return await kmock.RawHandler._handle(self, request)  # discovery and kmock's DSL

    def _get_resources(self) -> list[kmock.resource]:
        """Only what is declared (kmock would also list the resources of stored objects)."""
        return list(self.resources)

    async def _serve_version(self, request: kmock.Request) -> Obj:
        """kmock's resource list, with the core group-version spelt ``v1`` and verbs per subresource."""
        body: Obj = await super()._serve_version(request)
        if body.get("groupVersion") == "/v1":
            body["groupVersion"] = "v1"
        for item in body["resources"]:
            sub = item["name"].partition("/")[2]
            if sub:  # no short names here, or kubectl warns that `tj` may mean trainingjobs/status
                item.update(shortNames=[], categories=[], singularName="",
                            verbs={"log": ["get"], "eviction": ["create"]}.get(sub, ["get", "patch", "update"]))
        return body

    async def _serve_server_version(self, request: kmock.Request) -> Obj:
        """The kubectl version this was verified with (kmock says k3s 1.26: kubectl would warn of skew)."""
        body: Obj = await super()._serve_server_version(request)
        return {**body, "major": "1", "minor": "32", "gitVersion": "v1.32.0-kubetrain-dev"}

    async def _parse(self, raw: aiohttp.web.BaseRequest) -> kmock.Request:
        """A kmock Request with the Kubernetes fields from ``parse_api_path``."""
        if raw.content_type == "application/vnd.kubernetes.protobuf":
            raise api_error(415, "protobuf bodies are not supported by this API server: send JSON "
                                 "(kubectl create -f / apply -f do; kubectl create namespace|configmap|... do not)")
        body = await raw.read()
        text = body.decode("utf-8", errors="replace")
        data: Any = None
        if body:
            try:
                data = json.loads(text)
            except ValueError:
                data = None
        api = parse_api_path(raw.path)
        params = dict(raw.query)
        if api is not None and api.watch:
            params["watch"] = "true"
        resource = None if api is None else api.resource
        return kmock.Request(
            id=len(self._requests), raw_request=raw, url=raw.url, method=raw.method, params=params,
            headers=dict(raw.headers), cookies=dict(raw.cookies), body=body, text=text, data=data,
            action=_guess_action(raw.method, api, params), resource=resource,
            namespace=api.namespace if api else None, name=api.name if api else None,
            subresource=api.subresource if api else None)

    # -- routing -------------------------------------------------------------------------------

    async def _serve_resource(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """Route a resource request by method, name and subresource, as the real server does."""
        t = self._target(request)
        method, sub = request.method.upper(), t.subresource
        if method == "GET" and request.params.get("watch") in ("true", "1"):
            return await self._serve_watch(request, t)
        if t.name is None:
            routes = {"GET": self._serve_list, "POST": self._serve_create, "DELETE": self._serve_delete_collection}
        elif sub == "log":
            routes = {"GET": self._serve_log}
        elif sub == "eviction":
            routes = {"POST": self._serve_eviction}
        elif sub in (None, "status"):
            routes = {"GET": self._serve_fetch, "PUT": self._serve_replace, "PATCH": self._serve_update}
            if sub is None:
                routes["DELETE"] = self._serve_delete
        else:
            routes = {}
        if method not in routes:
            raise api_error(405, "the server does not allow this method on the requested resource")
        return await routes[method](request, t)

    def _target(self, request: kmock.Request) -> Target:
        res = request.resource
        assert res is not None
        if res not in self.resources:
            raise api_error(404, "the server could not find the requested resource")
        info = self.resources[res]
        namespace = request.namespace
        if (namespace is not None and not info.namespaced) or (
                info.namespaced and namespace is None and request.name is not None):
            raise api_error(404, "the server could not find the requested resource")
        if request.subresource is not None and request.subresource not in info.subresources:
            raise api_error(404, "the server could not find the requested resource")
        return Target(res, info, namespace, request.name, request.subresource)

    # -- reads ---------------------------------------------------------------------------------

    def _get(self, key: Key) -> Obj | None:
        stored = self.objects[key] if key in self.objects else None
        return None if stored is None or stored.deleted else stored.raw

    def _require(self, t: Target) -> Obj:
        obj = self._get(t.key)
        if obj is None:
            raise _not_found(t.res, t.key[2])
        return obj

    def _live(self, res: kmock.resource | None = None) -> Iterator[tuple[Key, Obj]]:
        """All stored, not removed objects (of one resource), in (namespace, name) order."""
        keys = sorted((k for k in self.objects.keys() if res is None or k[0] == res),
                      key=lambda k: (k[1] or "", k[2]))
        for key in keys:
            if (obj := self._get(key)) is not None:
                yield key, obj

    async def _serve_fetch(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        async with self._lock:
            obj = self._require(t)
        return self._respond(request, t, obj)

    async def _serve_list(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        match = request_selector(request.params, t.namespace)
        async with self._lock:
            items = [obj for _, obj in self._live(t.res) if match(obj)]
            rv = str(self._rv)
        if _wants_table(request):
            return aiohttp.web.json_response(self._table(t, items, rv))
        return aiohttp.web.json_response(self._list_body(t, items, rv))

    def _list_body(self, t: Target, items: list[Obj], rv: str | None = None) -> Obj:
        return {"apiVersion": _api_version(t.res), "kind": f"{t.info.kind}List",
                "metadata": {"resourceVersion": rv or str(self._rv)}, "items": items}

    def _respond(self, request: kmock.Request, t: Target, obj: Obj, status: int = 200) -> aiohttp.web.StreamResponse:
        if _wants_table(request):
            return aiohttp.web.json_response(self._table(t, [obj], str(self._rv)), status=status)
        return aiohttp.web.json_response(obj, status=status)

    async def _serve_log(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        """The file the pod executor writes, ``<log_dir>/<namespace>/<name>_<uid>.log``."""
        async with self._lock:
            pod = self._require(t)
        if self.log_dir is None:
            raise api_error(404, "pod logs are not available: the API server was started without a log_dir")
        path = self.log_dir / str(t.namespace) / f"{t.name}_{_meta(pod).get('uid')}.log"
        if not path.exists():
            raise api_error(400, f'container in pod "{t.name}" is waiting to start: no log yet')
        text = path.read_text(errors="replace")
        if (tail := request.params.get("tailLines")) is not None:
            if not tail.isdigit():
                raise api_error(400, f"tailLines must be a non-negative integer, not {tail!r}")
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(tail):]) if int(tail) > 0 else ""
        return aiohttp.web.Response(text=text, content_type="text/plain")

    # -- watch ---------------------------------------------------------------------------------

    async def _serve_watch(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        """Stream JSON lines until ``timeoutSeconds``, the client hanging up, or server shutdown."""
        raw = request._raw_request
        assert raw is not None
        match = request_selector(request.params, t.namespace, t.name)
        send_initial = request.params.get("sendInitialEvents") == "true"  # kubectl >= 1.35's watch-list
        since = None if send_initial else _resource_version(request.params.get("resourceVersion"))
        events = self._watch_events(t, match, since, initial_events_end=send_initial)
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(raw)
        timeout = request.params.get("timeoutSeconds")
        deadline = asyncio.get_running_loop().time() + float(timeout) if timeout else None
        as_table = _wants_table(request)  # kubectl get -w: each event carries a one-row Table
        try:
            while (event := await self._next_event(events, deadline)) is not None:
                if as_table and event["type"] not in ("ERROR", "BOOKMARK"):
                    event = {**event, "object": self._table(t, [event["object"]], str(self._rv))}
                await response.write(json.dumps(event).encode() + b"\n")
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the client went away
        finally:
            await events.aclose()
        return response

    async def _next_event(self, events: AsyncIterator[Obj], deadline: float | None) -> Obj | None:
        """The next event, or None at the deadline, at shutdown, or when the stream ended."""
        loop = asyncio.get_running_loop()
        nxt = asyncio.ensure_future(anext(events))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            await asyncio.wait({nxt, closing}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not nxt.done():
                nxt.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await nxt
        if nxt.cancelled():
            return None
        if (exc := nxt.exception()) is None:
            return nxt.result()
        if isinstance(exc, StopAsyncIteration):
            return None
        raise exc

    async def _watch_events(self, t: Target, match: Selector, since: int | None,
                            initial_events_end: bool = False) -> AsyncIterator[Obj]:
        """The initial events (state or replay), then the live ones, as this watcher sees them.

        ``initial_events_end`` (``sendInitialEvents=true``): after the state, a BOOKMARK annotated
        ``k8s.io/initial-events-end``, which a watch-list client waits for before it trusts its cache.
        """
        bus = self._buses[t.res]
        async with self._lock:
            mark = await bus.mark()
            initial = self._initial_events(t.res, match, since)
            bookmark = {"type": "BOOKMARK", "object": {
                "kind": self.resources[t.res].kind, "apiVersion": f"{t.res.group}/{t.res.version}".lstrip("/"),
                "metadata": {"resourceVersion": str(self._rv), "annotations": {"k8s.io/initial-events-end": "true"}}}}
        try:
            for event in initial:
                yield event
            if initial and initial[-1]["type"] == "ERROR":
                return
            if initial_events_end:
                yield bookmark
            async for event in bus.stream(since=mark):
                if (seen := _as_seen(event, match)) is not None:
                    yield seen
        finally:
            await bus.unmark(mark)

    def _initial_events(self, res: kmock.resource, match: Selector, rv: int | None) -> list[Obj]:
        """ADDED for the current state, or a replay after ``rv``, or a 410 ERROR if too old."""
        if not rv:
            return [{"type": "ADDED", "object": obj} for _, obj in self._live(res) if match(obj)]
        if rv < self._expired_rv[res] or rv > self._rv:  # too old, or from before a server restart
            status = status_body(410, f"too old resource version: {rv} ({self._expired_rv[res]})", "Expired")
            return [{"type": "ERROR", "object": status}]
        replay = (_as_seen(e, match) for e in self._events.get(res, ()) if e["rv"] > rv)
        return [e for e in replay if e is not None]

    # -- writes: bookkeeping -------------------------------------------------------------------

    def _store(self, key: Key, obj: Obj) -> Obj:
        """Stamp the next resourceVersion on ``obj`` and store it as the key's newest version."""
        self._rv += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self._rv)
        if key in self.objects:
            history = self.objects[key].history
            history.append(obj)
            del history[: -self.history_limit]
        else:
            self.objects[key] = obj
        return obj

    async def _publish(self, res: kmock.resource, kind: str, obj: Obj, old: Obj | None = None) -> None:
        """Log the event for watch resumption and put it on the resource's bus (lock held)."""
        event = {"type": kind, "object": obj, "old": old, "rv": int(_meta(obj)["resourceVersion"])}
        log_ = self._events.setdefault(res, deque(maxlen=self.event_window))
        if len(log_) == log_.maxlen:
            self._expired_rv[res] = log_[0]["rv"]
        log_.append(event)
        await self._buses[res].put(event)

    async def _commit(self, key: Key, obj: Obj, old: Obj | None) -> Obj:
        """Store a created or changed object, send ADDED/MODIFIED, react to CRDs (lock held)."""
        self._store(key, obj)
        await self._publish(key[0], "MODIFIED" if old is not None else "ADDED", obj, old)
        if key[0] == CRD_RESOURCE:
            self._declare_crd(obj, old)
        return obj

    async def _remove(self, key: Key, obj: Obj, *, cascade: bool = True) -> Obj:
        """Remove an object for good: DELETED (with a new resourceVersion), then GC (lock held)."""
        final = copy.deepcopy(obj)
        self._store(key, final)
        self.objects[key].delete()
        await self._publish(key[0], "DELETED", final)
        if key[0] == CRD_RESOURCE:
            await self._undeclare_crd(final)
        if cascade:
            self._background(self._collect_dependents(_meta(final).get("uid")))
        return final

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- create --------------------------------------------------------------------------------

    async def _serve_create(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        body = _checked_object(request.data)
        async with self._lock:
            obj = await self._create(t, copy.deepcopy(body))
        return self._respond(request, t, obj, status=201)

    async def _create(self, t: Target, body: Obj) -> Obj:
        """Validate, name, stamp and store a new object (lock held)."""
        namespace = self._create_namespace(t, body)
        obj = self._new_object(t.res, namespace, body)
        name = _meta(obj)["name"]
        if t.res == CRD_RESOURCE:
            _validate_crd(obj)
        if self._get((t.res, namespace, name)) is not None:
            raise api_error(409, f'{_describe(t.res)} "{name}" already exists', reason="AlreadyExists",
                            name=name, group=t.res.group, kind=t.res.plural)
        return await self._commit((t.res, namespace, name), obj, None)

    def _create_namespace(self, t: Target, body: Obj) -> str | None:
        """The namespace from the URL; it must match the body's and exist, and not be terminating."""
        if not t.info.namespaced:
            return None
        if t.namespace is None:
            raise api_error(404, "the server could not find the requested resource")
        in_body = _meta(body).get("namespace")
        if in_body and in_body != t.namespace:
            raise api_error(400, "the namespace of the provided object does not match "
                                 "the namespace sent on the request")
        namespace = self._get((NAMESPACES, None, t.namespace))
        if namespace is None:
            raise _not_found(NAMESPACES, t.namespace)
        if _meta(namespace).get("deletionTimestamp"):
            raise api_error(403, f"unable to create new content in namespace {t.namespace} "
                                 "because it is being terminated")
        return t.namespace

    def _new_object(self, res: kmock.resource, namespace: str | None, body: Obj) -> Obj:
        """The body with the metadata and defaults a real server adds on create."""
        info = self.resources[res]
        obj = {**body, "apiVersion": _api_version(res), "kind": info.kind}
        meta = obj["metadata"] = dict(_meta(body))
        for field in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds", "uid"):
            meta.pop(field, None)
        meta["name"] = self._object_name(res, namespace, meta, info.kind or "")
        if namespace is not None:
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
        if "status" in info.subresources:
            obj.pop("status", None)
        _apply_defaults(res, obj)
        return obj

    def _object_name(self, res: kmock.resource, namespace: str | None, meta: Obj, kind: str) -> str:
        name = meta.get("name")
        if not name and meta.get("generateName"):
            for _ in range(10):
                name = str(meta["generateName"])[:58] + "".join(random.choices(_NAME_ALPHABET, k=5))
                if self._get((res, namespace, name)) is None:
                    break
        if not name:
            raise _invalid(kind, "", "metadata.name", "Required value: name or generateName is required")
        if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
            raise _invalid(kind, name, "metadata.name",
                           f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case '
                           "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character")
        return name

    # -- update --------------------------------------------------------------------------------

    async def _serve_update(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        content_type = _header(request, "Content-Type").split(";")[0].strip().lower()
        async with self._lock:
            current = self._require(t)
            candidate = apply_patch(copy.deepcopy(current), content_type, request.data,
                                    strategic_ok=t.res.group in ("", "apiextensions.k8s.io",
                                                                 "coordination.k8s.io", "events.k8s.io"))
            obj = await self._update(t, current, candidate)
        return self._respond(request, t, obj)

    async def _serve_replace(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        body = _checked_object(request.data)
        if _meta(body).get("name") not in (None, t.name):
            raise api_error(400, "the name of the object does not match the name on the URL")
        async with self._lock:
            current = self._require(t)
            obj = await self._update(t, current, copy.deepcopy(body))
        return self._respond(request, t, obj)

    async def _update(self, t: Target, current: Obj, candidate: Obj) -> Obj:
        """Check, merge and store a PUT/PATCH result; remove the object if its finalizers are done."""
        wanted_rv = _meta(candidate).get("resourceVersion")
        if wanted_rv and wanted_rv != _meta(current)["resourceVersion"]:
            raise _conflict(t.res, t.key[2], "the object has been modified; please apply your changes "
                                             "to the latest version and try again")
        new = _merged_update(t, current, candidate)
        if t.res == CRD_RESOURCE:
            _validate_crd(new)
        if new == current:
            return current  # a no-op write: no new resourceVersion, no event
        await self._commit(t.key, new, current)
        if _ready_to_remove(t.res, new):
            return await self._remove(t.key, new)
        return new

    # -- delete --------------------------------------------------------------------------------

    async def _serve_delete(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        options = _delete_options(request)
        async with self._lock:
            obj = await self._delete(t.key, self._require(t), options)
        return aiohttp.web.json_response(obj)

    async def _serve_delete_collection(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        options = _delete_options(request)
        options.pop("preconditions", None)
        match = request_selector(request.params, t.namespace)
        async with self._lock:
            deleted = [await self._delete(key, obj, options) for key, obj in list(self._live(t.res)) if match(obj)]
        return aiohttp.web.json_response(self._list_body(t, deleted))

    async def _delete(self, key: Key, obj: Obj, options: Obj) -> Obj:
        """Delete as the real server does: preconditions, pod grace, finalizers (lock held)."""
        _check_preconditions(key, obj, options.get("preconditions") or {})
        if key[0] == NAMESPACES:
            return await self._delete_namespace(key, obj)
        grace = _grace_seconds(key[0], obj, options.get("gracePeriodSeconds"))
        meta = _meta(obj)
        if meta.get("deletionTimestamp") and grace >= (meta.get("deletionGracePeriodSeconds") or 0):
            return obj  # already going away at least this fast
        if grace > 0 or meta.get("finalizers"):
            return await self._mark_deleting(key, obj, grace)
        return await self._remove(key, obj, cascade=options.get("propagationPolicy") != "Orphan")

    async def _mark_deleting(self, key: Key, obj: Obj, grace: int) -> Obj:
        """Set deletionTimestamp (now + grace) and deletionGracePeriodSeconds: MODIFIED."""
        new = copy.deepcopy(obj)
        new["metadata"].update(deletionTimestamp=now_rfc3339(grace), deletionGracePeriodSeconds=grace)
        await self._commit(key, new, obj)
        if _ready_to_remove(key[0], new):
            return await self._remove(key, new)
        return new

    async def _delete_namespace(self, key: Key, obj: Obj) -> Obj:
        """Mark the namespace Terminating; a background task empties and then removes it."""
        if _meta(obj).get("deletionTimestamp"):
            return obj
        new = copy.deepcopy(obj)
        new["metadata"]["deletionTimestamp"] = now_rfc3339()
        new["status"] = {**(new.get("status") or {}), "phase": "Terminating"}
        await self._commit(key, new, obj)
        self._background(self._finish_namespace(key[2]))
        return new

    async def _finish_namespace(self, namespace: str) -> None:
        """Delete everything in the namespace, wait until it is gone, then remove the namespace."""
        async with self._lock:
            for key, _ in list(self._live()):
                if key[1] == namespace and (current := self._get(key)) is not None:
                    await self._delete(key, current, {})
        while not self._closing.is_set():
            async with self._lock:
                if not any(key[1] == namespace for key, _ in self._live()):
                    ns_key = (NAMESPACES, None, namespace)
                    if (ns := self._get(ns_key)) is not None:
                        await self._remove(ns_key, ns)
                    return
            await asyncio.sleep(0.1)

    async def _collect_dependents(self, owner_uid: str | None) -> None:
        """Background GC: delete the objects whose owners are now all gone."""
        if not owner_uid:
            return
        async with self._lock:
            live_uids = {_meta(obj).get("uid") for _, obj in self._live()}
            for key, obj in list(self._live()):
                owners = {ref.get("uid") for ref in _meta(obj).get("ownerReferences") or []}
                if owner_uid in owners and not owners & live_uids and (current := self._get(key)) is not None:
                    await self._delete(key, current, {})

    # -- pods ----------------------------------------------------------------------------------

    async def _serve_eviction(self, request: kmock.Request, t: Target) -> aiohttp.web.StreamResponse:
        """Mark the pod DisruptionTarget, then delete it gracefully with the Eviction's options."""
        eviction = request.data if isinstance(request.data, dict) else {}
        async with self._lock:
            pod = self._require(t)
            new = copy.deepcopy(pod)
            _set_condition(new, {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                                 "message": "Eviction API: evicting", "lastTransitionTime": now_rfc3339()})
            if new != pod:
                await self._commit(t.key, new, pod)
            await self._delete(t.key, new, eviction.get("deleteOptions") or {})
        return aiohttp.web.json_response(status_body(201), status=201)

    # -- CRDs ----------------------------------------------------------------------------------

    async def register_crd(self, crd: Mapping[str, Any]) -> Obj:
        """Create (or, if it exists, replace) a CustomResourceDefinition from a dict, as the API would."""
        t = Target(CRD_RESOURCE, self.resources[CRD_RESOURCE], None, _meta(crd).get("name"), None)
        async with self._lock:
            current = self._get(t.key) if t.name else None
            if current is None:
                return await self._create(t, copy.deepcopy(dict(crd)))
            candidate = {**copy.deepcopy(dict(crd)), "metadata": {**_meta(crd), "resourceVersion": None}}
            return await self._update(t, current, candidate)

    def _declare_crd(self, crd: Obj, old: Obj | None) -> None:
        """Serve the CRD's versions (and stop serving versions it no longer has)."""
        declared = _crd_resources(crd)
        for res in set(_crd_resources(old) if old else {}) - set(declared):
            self.resources.pop(res, None)
            self._columns.pop(res, None)
        for res, (info, columns) in declared.items():
            self.resources[res] = info
            self._columns[res] = columns

    async def _undeclare_crd(self, crd: Obj) -> None:
        """Remove the CRD's objects (DELETED events) and stop serving its versions."""
        for res in _crd_resources(crd):
            for key, obj in list(self._live(res)):
                await self._remove(key, obj)
            self.resources.pop(res, None)
            self._columns.pop(res, None)

    # -- tables and openapi --------------------------------------------------------------------

    def _table(self, t: Target, items: list[Obj], rv: str) -> Obj:
        """A ``meta.k8s.io/v1`` Table, as kubectl asks for: printer columns or name/age."""
        columns = self._columns.get(t.res) or _DEFAULT_COLUMNS.get(t.res.plural or "", [])
        defs = [{"name": "Name", "type": "string", "format": "name", "description": "", "priority": 0}]
        defs += [{"name": c["name"], "type": c.get("type", "string"), "format": "", "description": "",
                  "priority": c.get("priority", 0)} for c in columns]
        if not any(c["jsonPath"] == ".metadata.creationTimestamp" for c in columns):
            defs.append({"name": "Age", "type": "date", "format": "", "description": "", "priority": 0})
            columns = [*columns, {"jsonPath": ".metadata.creationTimestamp", "type": "date"}]
        rows = [{"cells": [_meta(obj).get("name")] + [_cell(obj, c) for c in columns],
                 "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                            "metadata": _meta(obj)}} for obj in items]
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

    def _serve_faults(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        method = request.method.upper()
        if method == "POST":
            fault = Fault.from_json(request.data)
            self._faults.append(fault)
            return aiohttp.web.json_response(fault.to_json(), status=201)
        if method == "DELETE":
            self._faults.clear()
        elif method != "GET":
            raise api_error(405, "faults: use GET, POST or DELETE")
        return aiohttp.web.json_response({"faults": [f.to_json() for f in self._faults if not f.spent],
                                          "spent": [f.to_json() for f in self._faults if f.spent]})

    def _check_faults(self, method: str, path: str) -> None:
        """Fail this request if an armed fault matches it (before it has any effect)."""
        for fault in self._faults:
            if not fault.spent and fault.matches(method, path):
                fault.hits += 1
                if fault.count is not None:
                    fault.count -= 1
                raise api_error(fault.status, fault.message or f"injected fault ({fault.status})")

    # -- lifecycle -----------------------------------------------------------------------------

    async def close(self) -> None:
        """End the watch streams and the background tasks (GC, namespace deletion)."""
        self._closing.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# ---------------------------------------------------------------------------------------------
# Helpers of the emulator that need no state


_DEFAULT_COLUMNS: dict[str, list[Obj]] = {
    "pods": [{"name": "Status", "type": "string", "jsonPath": ".status.phase"},
             {"name": "Node", "type": "string", "jsonPath": ".spec.nodeName", "priority": 1}],
    "namespaces": [{"name": "Status", "type": "string", "jsonPath": ".status.phase"}],
    "customresourcedefinitions": [{"name": "Created At", "type": "string",
                                   "jsonPath": ".metadata.creationTimestamp"}],
}


def _cell(obj: Obj, column: Obj) -> Any:
    value = _json_path(obj, column["jsonPath"])
    if column["jsonPath"] == ".status.phase" and _meta(obj).get("deletionTimestamp"):
        return "Terminating"
    if column.get("type") == "date":
        return _age(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return value  # kubectl prints None as <none>


def _header(request: kmock.Request, name: str) -> str:
    """A request header, case-insensitively (kmock keeps them in a plain dict)."""
    raw = request._raw_request
    return raw.headers.get(name, "") if raw is not None else ""


def _wants_table(request: kmock.Request) -> bool:
    return "as=Table" in _header(request, "Accept")


def _resource_version(value: str | None) -> int | None:
    """A watch's ``resourceVersion``: None or 0 mean "from the current state"."""
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise api_error(400, f"invalid resourceVersion: {value!r}") from None


def _hash_gv(resources: list[kmock.resource]) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, ",".join(sorted(map(str, resources)))).hex[:16]


def _api_version(res: kmock.resource) -> str:
    return f"{res.group}/{res.version}" if res.group else str(res.version)


def _guess_action(method: str, api: ApiPath | None, params: Mapping[str, str]) -> kmock.action | None:
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


def _as_seen(event: Obj, match: Selector) -> Obj | None:
    """The event as a watcher with this selector sees it: entering is ADDED, leaving is DELETED."""
    kind, obj, old = event["type"], event["object"], event.get("old")
    now, before = match(obj), old is not None and match(old)
    if kind == "MODIFIED":
        kind = "MODIFIED" if now and before else "ADDED" if now else "DELETED" if before else ""
    elif not now:
        kind = ""
    return {"type": kind, "object": obj} if kind else None


def _apply_defaults(res: kmock.resource, obj: Obj) -> None:
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


def _merged_update(t: Target, current: Obj, candidate: Obj) -> Obj:
    """The object to store for a PUT/PATCH: status isolation, kept metadata, generation."""
    if t.subresource == "status":
        new = copy.deepcopy(current)
        if candidate.get("status") is None:
            new.pop("status", None)
        else:
            new["status"] = copy.deepcopy(candidate["status"])
        return new
    new = copy.deepcopy(candidate)
    if t.has_status:
        new.pop("status", None)
        if "status" in current:
            new["status"] = copy.deepcopy(current["status"])
    meta, old_meta = new.setdefault("metadata", {}), _meta(current)
    for field in ("name", "namespace", "uid", "creationTimestamp", "generation", "resourceVersion",
                  "deletionTimestamp", "deletionGracePeriodSeconds"):
        if field in old_meta:
            meta[field] = old_meta[field]
        else:
            meta.pop(field, None)
    if old_meta.get("deletionTimestamp") and set(meta.get("finalizers") or []) - set(old_meta.get("finalizers") or []):
        raise _invalid(str(current.get("kind")), old_meta["name"], "metadata.finalizers",
                       "Forbidden: no new finalizers can be added if the object is being deleted")
    new.setdefault("apiVersion", current.get("apiVersion"))
    new.setdefault("kind", current.get("kind"))
    if _spec_part(new) != _spec_part(current):
        meta["generation"] = int(old_meta.get("generation") or 1) + 1
    return new


def _delete_options(request: kmock.Request) -> Obj:
    """DeleteOptions from the body, with ``gracePeriodSeconds``/``propagationPolicy`` from the query."""
    options = dict(request.data) if isinstance(request.data, dict) else {}
    for param in ("gracePeriodSeconds", "propagationPolicy"):
        if param in request.params:
            options[param] = request.params[param]
    if options.get("gracePeriodSeconds") is not None:
        try:
            options["gracePeriodSeconds"] = int(options["gracePeriodSeconds"])
        except (TypeError, ValueError):
            raise api_error(400, "gracePeriodSeconds must be an integer") from None
    return options


def _grace_seconds(res: kmock.resource, obj: Obj, requested: int | None) -> int:
    """0 except for a bound, still running pod: the requested or its own grace period."""
    if res != PODS:
        return 0
    if not (obj.get("spec") or {}).get("nodeName") or (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return 0
    if requested is not None:
        return max(0, requested)
    default = (obj.get("spec") or {}).get("terminationGracePeriodSeconds")
    return DEFAULT_GRACE_SECONDS if default is None else int(default)


def _check_preconditions(key: Key, obj: Obj, preconditions: Obj) -> None:
    meta = _meta(obj)
    for field in ("uid", "resourceVersion"):
        wanted = preconditions.get(field)
        if wanted and wanted != meta.get(field):
            raise _conflict(key[0], key[2], f"Precondition failed: {field} in precondition: {wanted}, "
                                            f"{field} in object meta: {meta.get(field)}")


def _validate_crd(crd: Obj) -> None:
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    name = _meta(crd).get("name", "")
    if not spec.get("group") or not names.get("plural") or not names.get("kind") or not spec.get("versions"):
        raise _invalid("CustomResourceDefinition", name, "spec", "Required value: group, names.plural, "
                                                                 "names.kind and versions are required")
    if name != f"{names['plural']}.{spec['group']}":
        raise _invalid("CustomResourceDefinition", name, "metadata.name",
                       f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group')


def _crd_resources(crd: Obj) -> dict[kmock.resource, tuple[kmock.ResourceInfo, list[Obj]]]:
    """The resources a CRD serves, with their discovery info and printer columns."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    result = {}
    for version in spec.get("versions") or []:
        if not version.get("served", True):
            continue
        subresources = {"status"} if "status" in (version.get("subresources") or {}) else set()
        info = kmock.ResourceInfo(
            kind=names["kind"], singular=names.get("singular") or names["kind"].lower(),
            namespaced=spec.get("scope", "Namespaced") == "Namespaced", verbs=ALL_VERBS,
            shortnames=names.get("shortNames") or (), categories=names.get("categories") or (),
            subresources=subresources)
        result[kmock.resource(spec["group"], version["name"], names["plural"])] = (
            info, list(version.get("additionalPrinterColumns") or []))
    return result


# ---------------------------------------------------------------------------------------------
# Serving


@dataclasses.dataclass(frozen=True)
class ApiServer:
    """A running server: its base URL (``http://host:port``) and the emulator, for assertions."""

    url: str
    host: str
    port: int
    emulator: KubeApiEmulator


def load_crds(paths: Iterable[str | pathlib.Path]) -> list[Obj]:
    """The CustomResourceDefinition documents in YAML files (other documents are skipped)."""
    crds = []
    for path in paths:
        for doc in yaml.safe_load_all(pathlib.Path(path).read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                crds.append(doc)
    return crds


@contextlib.asynccontextmanager
async def serve(host: str = "127.0.0.1", port: int = 0, *, log_dir: str | pathlib.Path | None = None,
                crds: Iterable[Mapping[str, Any] | str | pathlib.Path] = (),
                audit_log: str | pathlib.Path | None = None) -> AsyncIterator[ApiServer]:
    """Run the API server on ``host:port`` (0: a free port) while the context is open.

    ``crds`` are CRD dicts or YAML files, registered before the server listens; ``audit_log`` gets
    one JSON line per resource request (user, verb, resource).
    """
    emulator = KubeApiEmulator(log_dir=log_dir, audit_log=audit_log)
    async with emulator:
        for crd in crds:
            for doc in load_crds([crd]) if isinstance(crd, (str, pathlib.Path)) else [crd]:
                await emulator.register_crd(doc)
        server = aiohttp.web.Server(emulator, handler_cancellation=True)
        runner = aiohttp.web.ServerRunner(server, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = aiohttp.web.TCPSite(runner, host, port)
            await site.start()
            bound_port = runner.addresses[0][1]
            yield ApiServer(url=f"http://{host}:{bound_port}", host=host, port=bound_port, emulator=emulator)
        finally:
            await emulator.close()
            await runner.cleanup()


def write_kubeconfig(path: str | pathlib.Path, url: str, namespace: str = "default",
                     token: str = "kubetrain-dev-token") -> pathlib.Path:
    """A kubeconfig for ``url`` (plain HTTP, a dummy token) that kubectl, kopf and the client accept.

    The token is not checked; it names the component in the audit log.
    """
    config = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": "kubetrain-dev", "cluster": {"server": url}}],
        "users": [{"name": "kubetrain-dev", "user": {"token": token}}],
        "contexts": [{"name": "kubetrain-dev",
                      "context": {"cluster": "kubetrain-dev", "user": "kubetrain-dev", "namespace": namespace}}],
        "current-context": "kubetrain-dev",
    }
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def _run(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(args.host, args.port, log_dir=args.log_dir, crds=args.crd, audit_log=args.audit_log) as server:
        print(f"kubetrain apiserver listening on {server.url}", flush=True)
        await stop.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetrain.devcluster.apiserver",
                                     description="A Kubernetes API server for the dev cluster (kmock-based).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--log-dir", type=pathlib.Path, help="where the pod executor writes pod logs")
    parser.add_argument("--crd", action="append", default=[], metavar="FILE", help="CRD YAML to register (repeatable)")
    parser.add_argument("--audit-log", type=pathlib.Path, help="append one JSON line per resource request (user, verb, resource)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
