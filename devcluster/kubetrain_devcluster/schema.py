"""What kube-apiserver does with a custom resource's body against its CRD's structural schema.

On every create and update (status included) of a custom resource: unknown fields are pruned (or,
with ``fieldValidation=Strict``, as ``kubectl apply`` asks, refused with 400), null values of fields that
are not ``nullable`` are dropped, and what remains is validated against the version's openAPIV3Schema:
type, enum, bounds, lengths, pattern, item and property counts, required. Every problem is collected
into one 422 ``Invalid`` Status with a cause per field, worded and pathed as kube-apiserver does
(``spec.nodes: Invalid value: 0: spec.nodes in body should be greater than or equal to 1``), so
``kubectl apply`` of a bad spec is refused at apply time, as on a real cluster. Defaulting and CEL
rules (x-kubernetes-validations) are not emulated: the CRD uses neither for validation.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .errors import api_error

Schema = dict[str, Any]
MAX_VALUE_CHARS = 80  # of a value quoted in a message (kube-apiserver truncates long values too)
JSON_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"), (dict, "object"))


class FieldErrors(list):
    """(reason, field path, message) of each problem found; the Status's message prefixes each with its path."""

    def add(self, reason: str, path: str, message: str) -> None:
        self.append((reason, path, message))


def prune(value: Any, schema: Schema, path: str, unknown: list[str], root: bool = False) -> Any:
    """`value` without the fields the schema does not declare (their paths go to `unknown`) and without
    nulls where the schema does not allow them."""
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        keep_unknown = schema.get("x-kubernetes-preserve-unknown-fields")
        out = {}
        for key, child in value.items():
            here = f"{path}.{key}" if path else key
            if root and key in ("apiVersion", "kind", "metadata"):
                out[key] = child  # ObjectMeta is the server's, not the schema's
                continue
            sub = (props or {}).get(key)
            if sub is None and isinstance(extra, dict):
                sub = extra
            if sub is None:
                if keep_unknown:
                    out[key] = child
                else:
                    unknown.append(here)
                continue
            if child is None and not sub.get("nullable"):
                continue
            out[key] = prune(child, sub, here, unknown)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"], f"{path}[{i}]", unknown) for i, item in enumerate(value)]
    return value


def validate(value: Any, schema: Schema, path: str, errors: FieldErrors) -> None:
    """Check `value` (already pruned) against one schema node and its subtree."""
    if value is None:
        if not schema.get("nullable"):
            errors.add("FieldValueTypeInvalid", path, f'Invalid value: "null": {path} in body must be of type '
                                                      f'{schema.get("type", "object")}: "null"')
        return
    if not _type_ok(value, schema):
        got = json_type(value)
        errors.add("FieldValueTypeInvalid", path, f'Invalid value: "{got}": {path} in body must be of type '
                                                  f'{schema["type"]}: "{got}"')
        return
    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(_show(v) for v in schema["enum"])
        errors.add("FieldValueNotSupported", path, f"Unsupported value: {_show(value)}: supported values: {supported}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_number(value, schema, path, errors)
    elif isinstance(value, str):
        _check_string(value, schema, path, errors)
    elif isinstance(value, list):
        _check_count(len(value), schema, "Items", path, errors)
        if isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                validate(item, schema["items"], f"{path}[{i}]", errors)
    elif isinstance(value, dict):
        _check_count(len(value), schema, "Properties", path, errors)
        props = schema.get("properties") or {}
        for key in schema.get("required") or ():
            if key not in value:
                errors.add("FieldValueRequired", f"{path}.{key}" if path else key, "Required value")
        extra = schema.get("additionalProperties")
        for key, child in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None and not (not path and key in ("apiVersion", "kind", "metadata")):
                validate(child, sub, f"{path}.{key}" if path else key, errors)


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    return next(name for kind, name in JSON_TYPES if isinstance(value, kind))


def _type_ok(value: Any, schema: Schema) -> bool:
    if schema.get("x-kubernetes-int-or-string"):
        return isinstance(value, str) or isinstance(value, int) and not isinstance(value, bool)
    wanted = schema.get("type")
    got = json_type(value)
    if wanted is None or wanted == got:
        return True
    if wanted == "number":
        return got == "integer"
    if wanted == "integer":  # JSON has numbers only: 2.0 is an integer to the API server
        return got == "number" and math.isfinite(value) and float(value).is_integer()
    return False


def _check_number(value: float, schema: Schema, path: str, errors: FieldErrors) -> None:
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None:
        if schema.get("exclusiveMinimum") and not value > low:
            errors.add("FieldValueInvalid", path, f"Invalid value: {_show(value)}: {path} in body should be greater than {_show(low)}")
        elif value < low:
            errors.add("FieldValueInvalid", path,
                       f"Invalid value: {_show(value)}: {path} in body should be greater than or equal to {_show(low)}")
    if high is not None:
        if schema.get("exclusiveMaximum") and not value < high:
            errors.add("FieldValueInvalid", path, f"Invalid value: {_show(value)}: {path} in body should be less than {_show(high)}")
        elif value > high:
            errors.add("FieldValueInvalid", path,
                       f"Invalid value: {_show(value)}: {path} in body should be less than or equal to {_show(high)}")


def _check_string(value: str, schema: Schema, path: str, errors: FieldErrors) -> None:
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        errors.add("FieldValueTooLong", path, f"Too long: may not be more than {schema['maxLength']} bytes")
    if "minLength" in schema and len(value) < schema["minLength"]:
        errors.add("FieldValueInvalid", path, f"Invalid value: {_show(value)}: {path} in body should be at least "
                                              f"{schema['minLength']} chars long")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.add("FieldValueInvalid", path, f"Invalid value: {_show(value)}: {path} in body should match "
                                              f"'{schema['pattern']}'")


def _check_count(count: int, schema: Schema, what: str, path: str, errors: FieldErrors) -> None:
    if f"max{what}" in schema and count > schema[f"max{what}"]:
        errors.add("FieldValueTooMany", path, f"Too many: {count}: must have at most {schema[f'max{what}']} items")
    if f"min{what}" in schema and count < schema[f"min{what}"]:
        errors.add("FieldValueInvalid", path, f"Invalid value: {count}: {path} in body should have at least "
                                              f"{schema[f'min{what}']} {what.lower()}")


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + '..."'


def admit(obj: dict, schema: Schema, kind: str, group: str, strict: bool) -> dict:
    """The object as kube-apiserver would store it, or the 400/422 it would answer."""
    name = (obj.get("metadata") or {}).get("name", "")
    unknown: list[str] = []
    pruned = prune(obj, schema, "", unknown, root=True)
    if strict and unknown:
        raise api_error(400, "strict decoding error: " + ", ".join(f'unknown field "{u}"' for u in unknown))
    errors = FieldErrors()
    validate(pruned, schema, "", errors)
    if errors:
        messages = [f"{path}: {message}" for _, path, message in errors]
        listed = messages[0] if len(messages) == 1 else "[" + ", ".join(messages) + "]"
        raise api_error(422, f'{kind}.{group} "{name}" is invalid: {listed}', name=name, group=group, kind=kind,
                        causes=[{"reason": reason, "message": message, "field": path} for reason, path, message in errors])
    return pruned


def admit_custom(crd: dict | None, version: str, obj: dict, kind: str, group: str, strict: bool) -> dict:
    """`admit` against the CRD's schema for `version`; without a CRD or schema, the object as it is."""
    found = version_schema(crd, version) if crd else None
    return obj if found is None else admit(obj, found, kind, group, strict)


def strict_fields(request: Any) -> bool:
    """fieldValidation=Strict (kubectl apply's default): an unknown field is an error, not silently pruned."""
    return request.params.get("fieldValidation") == "Strict"


def version_schema(crd: dict, version: str) -> Schema | None:
    for v in (crd.get("spec") or {}).get("versions") or []:
        if v.get("name") == version:
            return ((v.get("schema") or {}).get("openAPIV3Schema")) or None
    return None
