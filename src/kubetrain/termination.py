"""The trainer's last word to the operator: a pod termination message.

Kubernetes copies the file at a container's terminationMessagePath into the pod status when the
container exits (`state.terminated.message`). Rank 0 writes one small JSON document there, so the
operator learns the final step and the newest checkpoint without S3 credentials or pod exec.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

TERMINATION_MESSAGE_ENV = "KUBETRAIN_TERMINATION_MESSAGE_PATH"
MAX_BYTES = 4096  # what the kubelet keeps of a termination message


@dataclass(frozen=True)
class TrainerReport:
    outcome: str  # finished | preempted | failed
    step: int | None = None
    checkpoint_step: int | None = None
    checkpoint_uri: str | None = None
    checkpoint_time: str | None = None
    # failed: why (a contracts.Reason), one line for status.message, and whether a retry cannot help
    reason: str | None = None
    message: str | None = None
    permanent: bool = False
    # where the run started: {step, checkpoint (uri or None: scratch), why, changed: ["field old -> new"]}
    start: dict | None = None
    # finished with spec.output: the exported model {uri, step, formats, metrics}
    output: dict | None = None

    def encode(self) -> str:
        doc = asdict(self)
        if doc["message"] and len(doc["message"]) > MAX_BYTES // 2:
            doc["message"] = doc["message"][: MAX_BYTES // 2] + "..."
        if doc["start"]:  # bounded: the kubelet keeps MAX_BYTES of the whole message
            doc["start"] = {**doc["start"], "why": str(doc["start"].get("why", ""))[:300],
                            "changed": [str(c)[:200] for c in doc["start"].get("changed", [])[:8]]}
        if doc["output"]:
            doc["output"] = {**doc["output"], "uri": str(doc["output"].get("uri", ""))[:1024],
                             "metrics": dict(list((doc["output"].get("metrics") or {}).items())[:12])}
        return json.dumps({"kubetrain": {k: v for k, v in doc.items() if v is not None}}, separators=(",", ":"))


def decode_report(message: str | None) -> TrainerReport | None:
    """The report in a termination message; None for anything else (e.g. the log tail of a crash)."""
    try:
        doc = json.loads(message or "")
        report = TrainerReport(**doc["kubetrain"])
    except (ValueError, TypeError, KeyError):
        return None
    return report if report.outcome in ("finished", "preempted", "failed") else None


def write_termination_message(text: str) -> None:
    """Write where the pod spec says (no-op outside a pod); the kubelet keeps MAX_BYTES, the last ones here."""
    path = os.environ.get(TERMINATION_MESSAGE_ENV)
    if path:
        Path(path).write_text(text[-MAX_BYTES:], encoding="utf-8")


def write_report(report: TrainerReport) -> None:
    write_termination_message(report.encode())
