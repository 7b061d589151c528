"""Live progress of a running group, read from rank 0's /metrics (the same endpoint Prometheus scrapes).

Which pod hosts global rank 0 is decided by torchrun's rendezvous, so every pod IP is tried; only one
answers. Best effort and bounded, since a trainer pod is not trusted to answer well: each scrape has a
total deadline, a body cap, and few run at once (the others skip), so a slow or huge /metrics cannot
hold a reconcile or the operator's memory. A missed scrape only delays status.step.
"""

from __future__ import annotations

import socket
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from kubetrain.api import CheckpointRef, step_dir_name
from kubetrain.contracts import TrainerMetric as M
from kubetrain.contracts import timestamp

from .records import Progress

TIMEOUT_S = 1.0  # to connect, and for each read
DEADLINE_S = 2.0  # for the whole scrape of a group, every pod IP tried included
MAX_BODY_BYTES = 1 << 20  # a trainer's /metrics is a few kB
CHUNK_BYTES = 64 << 10
CONCURRENT_SCRAPES = 4  # of the operator's reconcile workers, at most this many wait on trainers
_slots = threading.BoundedSemaphore(CONCURRENT_SCRAPES)


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of the Prometheus text format: name -> value; the start record under M.STARTED_FROM."""
    values: dict = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                values[sample.name] = sample.value
            elif sample.name == M.EVAL_METRIC and "metric" in sample.labels:
                values.setdefault(M.EVAL_METRIC, {})[sample.labels["metric"]] = sample.value
            elif sample.name == M.STARTED_FROM:
                labels = sample.labels
                values[M.STARTED_FROM] = {"step": int(sample.value), "checkpoint": labels.get("checkpoint") or None,
                                          "why": labels.get("why", ""),
                                          "changed": [c for c in labels.get("changed", "").split("; ") if c]}
    return values


def progress_from_metrics(values: dict, checkpoint_prefix: str) -> Progress | None:
    if M.STEP not in values:
        return None
    step = int(values[M.STEP])
    ckpt = None
    ckpt_step = values.get(M.LAST_CHECKPOINT_STEP)
    ckpt_time = values.get(M.LAST_CHECKPOINT_TIMESTAMP)
    if ckpt_step and ckpt_time:
        when = timestamp(ckpt_time)
        ckpt = CheckpointRef(step=int(ckpt_step), uri=f"{checkpoint_prefix}/{step_dir_name(int(ckpt_step))}", time=when)
    total = values.get(M.TOTAL_STEPS)
    return Progress(step, ckpt, values.get(M.STARTED_FROM), total_steps=int(total) if total else None,
                    eta_seconds=values.get(M.ETA_SECONDS), tokens_per_second=values.get(M.TOKENS_PER_SECOND),
                    eval=values.get(M.EVAL_METRIC))


def scrape(pod_ips: list[str], port: int, checkpoint_prefix: str, deadline_s: float = DEADLINE_S) -> Progress | None:
    if not _slots.acquire(timeout=0.1):
        return None  # enough reconciles are waiting on trainers already: this one goes on without progress
    try:
        deadline = time.monotonic() + deadline_s
        for ip in pod_ips:
            body = fetch_metrics(ip, port, deadline)
            if body is None:
                continue
            try:
                found = progress_from_metrics(parse_metrics(body), checkpoint_prefix)
            except ValueError:  # not the Prometheus text format
                continue
            if found:
                return found
        return None
    finally:
        _slots.release()


def fetch_metrics(host: str, port: int, deadline: float) -> str | None:
    """GET /metrics over HTTP/1.0 with a hard deadline (time.monotonic()) and a size cap; None on any failure.

    A plain socket, not urllib: every wait is bounded by what is left of the deadline, headers included
    (http.client would wait TIMEOUT_S per byte of a trickled header, without end).
    """
    received, size = [], 0
    try:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        with socket.create_connection((host, port), timeout=min(TIMEOUT_S, left)) as sock:
            sock.sendall(f"GET /metrics HTTP/1.0\r\nHost: {host}\r\nAccept: text/plain\r\n\r\n".encode())
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                sock.settimeout(min(TIMEOUT_S, left))
                chunk = sock.recv(CHUNK_BYTES)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_BODY_BYTES + CHUNK_BYTES:  # the body cap, with room for the headers
                    return None
                received.append(chunk)
    except OSError:
        return None
    head, _, body = b"".join(received).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if len(status) < 2 or status[1] != b"200" or len(body) > MAX_BODY_BYTES:
        return None
    return body.decode("utf-8", errors="replace")
