"""Label and field selectors on list, watch and delete-collection."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from .errors import api_error
from .objects import Obj, Selector


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
