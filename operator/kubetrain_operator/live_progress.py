"""Live progress of a running group, read from rank 0's /metrics (the same endpoint Prometheus scrapes).

Which pod hosts global rank 0 is decided by torchrun's rendezvous, so every pod IP is tried; only one
answers. Best effort with a short timeout: a missed scrape only delays status.step.
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from kubetrain.api import CheckpointRef, step_dir_name
from kubetrain.contracts import TrainerMetric as M
from kubetrain.contracts import timestamp

from .records import Progress

TIMEOUT_S = 1.0


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of the Prometheus text format: name -> value."""
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if not sample.labels}


def progress_from_metrics(values: dict[str, float], checkpoint_prefix: str) -> Progress | None:
    if M.STEP not in values:
        return None
    step = int(values[M.STEP])
    ckpt = None
    ckpt_step = values.get(M.LAST_CHECKPOINT_STEP)
    ckpt_time = values.get(M.LAST_CHECKPOINT_TIMESTAMP)
    if ckpt_step and ckpt_time:
        when = timestamp(ckpt_time)
        ckpt = CheckpointRef(step=int(ckpt_step), uri=f"{checkpoint_prefix}/{step_dir_name(int(ckpt_step))}", time=when)
    return Progress(step, ckpt)


def scrape(pod_ips: list[str], port: int, checkpoint_prefix: str) -> Progress | None:
    for ip in pod_ips:
        try:
            with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=TIMEOUT_S) as resp:
                found = progress_from_metrics(parse_metrics(resp.read().decode()), checkpoint_prefix)
        except (OSError, ValueError):  # unreachable, or not the Prometheus text format
            continue
        if found:
            return found
    return None
