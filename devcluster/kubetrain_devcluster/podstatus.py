"""Pod status as a kubelet writes it: conditions, exit codes, termination messages, container status."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MAX_MESSAGE_BYTES = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048


def condition(kind: str, value: bool, reason: str | None = None, message: str | None = None) -> dict[str, Any]:
    cond: dict[str, Any] = {"type": kind, "status": "True" if value else "False"}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


def stamp_conditions(existing: Iterable[Mapping[str, Any]], updates: Iterable[Mapping[str, Any]],
                     now: str) -> list[dict[str, Any]]:
    """The updates with lastTransitionTime, which only moves when a condition's status changes.

    Only these are sent, with a strategic merge patch (conditions merge by type), so conditions
    that others wrote (DisruptionTarget from an eviction) are never overwritten from a stale cache.
    """
    old_by_type = {c.get("type"): c for c in existing}
    stamped = []
    for update in updates:
        old = old_by_type.get(update["type"])
        same = old is not None and old.get("status") == update["status"]
        stamped.append({**update, "lastProbeTime": None,
                        "lastTransitionTime": old.get("lastTransitionTime", now) if same and old else now})
    return stamped


def merge_conditions(existing: Iterable[Mapping[str, Any]], updates: Iterable[Mapping[str, Any]],
                     now: str) -> list[dict[str, Any]]:
    """What a strategic merge of stamped updates gives: ours replace the same type, others are kept."""
    merged = {c.get("type"): dict(c) for c in existing}
    for new in stamp_conditions(existing, updates, now):
        merged[new["type"]] = new
    return list(merged.values())


def exit_code_and_signal(returncode: int) -> tuple[int, int | None]:
    """asyncio's returncode (-N when killed by signal N) as a container exit code (128 + N)."""
    if returncode < 0:
        return 128 - returncode, -returncode
    return returncode, None


def read_head(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except OSError:
        return ""


def log_tail(path: Path, lines: int = FALLBACK_LOG_LINES, limit: int = FALLBACK_LOG_BYTES) -> str:
    """The last lines of a log, at most `limit` bytes (kubelet's FallbackToLogsOnError)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    tail = b"\n".join(data.splitlines()[-lines:])
    return tail[-limit:].decode("utf-8", "replace")


def termination_message(term_file: Path, log_file: Path, policy: str | None, failed: bool) -> str:
    """The termination message file, or with FallbackToLogsOnError and an empty file on failure, the log tail."""
    message = read_head(term_file, MAX_MESSAGE_BYTES)
    if not message and failed and policy == "FallbackToLogsOnError":
        message = log_tail(log_file)
    return message


def terminated_state(returncode: int, message: str, started_at: str | None, finished_at: str,
                     container_id: str | None) -> dict[str, Any]:
    code, sig = exit_code_and_signal(returncode)
    state: dict[str, Any] = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                             "startedAt": started_at, "finishedAt": finished_at}
    if sig is not None:
        state["signal"] = sig
    if message:
        state["message"] = message
    if container_id:
        state["containerID"] = container_id
    return state


def container_status(container: Mapping[str, Any], state: Mapping[str, Any], *, ready: bool = False,
                     started: bool = False, container_id: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": container.get("name", ""), "image": container.get("image", ""),
                           "imageID": "", "ready": ready, "started": started, "restartCount": 0,
                           "state": dict(state), "lastState": {}}
    if container_id:
        out["containerID"] = container_id
    return out
