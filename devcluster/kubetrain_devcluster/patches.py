"""PATCH bodies (merge, JSON and strategic merge) and what a PUT/PATCH may change."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import jsonpatch

from .errors import api_error, invalid
from .objects import Obj, meta
from .resources import Target


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
            return checked_object(jsonpatch.apply_patch(obj, patch))
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, KeyError, TypeError) as e:
            raise api_error(422, f"the json patch could not be applied: {e}") from e
    if content_type == "application/strategic-merge-patch+json" and strategic_ok:
        return checked_object(strategic_merge_patch(obj, checked_object(patch)))
    if content_type == "application/merge-patch+json":
        return checked_object(merge_patch(obj, checked_object(patch)))
    raise api_error(415, "the body of the request was in an unknown format - accepted media types include: "
                         "application/json-patch+json, application/merge-patch+json"
                    + (", application/strategic-merge-patch+json" if strategic_ok else ""))


def checked_object(body: Any) -> Obj:
    if not isinstance(body, dict):
        raise api_error(400, "the request body must be a JSON object")
    return body



def spec_part(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What ``generation`` counts: everything but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}



def merged_update(t: Target, current: Obj, candidate: Obj) -> Obj:
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
    md, old_meta = new.setdefault("metadata", {}), meta(current)
    for field in ("name", "namespace", "uid", "creationTimestamp", "generation", "resourceVersion",
                  "deletionTimestamp", "deletionGracePeriodSeconds"):
        if field in old_meta:
            md[field] = old_meta[field]
        else:
            md.pop(field, None)
    if old_meta.get("deletionTimestamp") and set(md.get("finalizers") or []) - set(old_meta.get("finalizers") or []):
        raise invalid(str(current.get("kind")), old_meta["name"], "metadata.finalizers",
                       "Forbidden: no new finalizers can be added if the object is being deleted")
    new.setdefault("apiVersion", current.get("apiVersion"))
    new.setdefault("kind", current.get("kind"))
    if spec_part(new) != spec_part(current):
        md["generation"] = int(old_meta.get("generation") or 1) + 1
    return new
