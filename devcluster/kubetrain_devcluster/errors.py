"""Kubernetes ``Status`` errors with the real codes, reasons and messages."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kmock

from .objects import Obj


REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
            405: "MethodNotAllowed", 409: "Conflict", 410: "Gone", 415: "UnsupportedMediaType",
            422: "Invalid", 429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable",
            504: "Timeout"}


def api_error(code: int, message: str, *, reason: str | None = None, **details: Any) -> kmock.KubernetesError:
    """A Kubernetes error; kmock renders it as a ``Status`` with this code (and no traceback)."""
    return kmock.KubernetesError(status=code, reason=reason or REASONS.get(code, "InternalError"),
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


def describe(res: kmock.resource) -> str:
    """How the real server names a resource in messages: ``pods``, ``trainingjobs.kubetrain.io``."""
    return f"{res.plural}.{res.group}" if res.group else str(res.plural)


def not_found(res: kmock.resource, name: str) -> kmock.KubernetesError:
    return api_error(404, f'{describe(res)} "{name}" not found', name=name, group=res.group, kind=res.plural)


def conflict(res: kmock.resource, name: str, why: str) -> kmock.KubernetesError:
    return api_error(409, f'Operation cannot be fulfilled on {describe(res)} "{name}": {why}',
                     name=name, group=res.group, kind=res.plural)


def invalid(kind: str, name: str, field: str, why: str) -> kmock.KubernetesError:
    return api_error(422, f'{kind} "{name}" is invalid: {field}: {why}', name=name, kind=kind,
                     causes=[{"reason": "FieldValueInvalid", "message": why, "field": field}])
