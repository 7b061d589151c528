"""What the benchmarks in bench/ share: device syncs, peak memory, and the trainer's step log as timed windows."""

from __future__ import annotations

import logging
import time

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


class StepLog(logging.Handler):
    """Collects the trainer's step log lines (emitted right after a device sync) with their time."""

    def __init__(self):
        super().__init__()
        self.windows: list[tuple[float, int, float, float]] = []  # (time, step, samples/s, tokens/s)
        self.evals: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not isinstance(record.msg, str):
            return
        if record.msg.startswith("step %d/%d"):
            a = record.args
            self.windows.append((time.perf_counter(), a[0], a[7], a[8]))
        elif record.msg.startswith("eval at step"):
            self.evals.append(record.getMessage())
