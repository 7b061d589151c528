"""What the benchmarks in bench/ share: device syncs, peak memory, and the trainer's step log as timed windows."""

from __future__ import annotations

import logging
import threading
import time
import traceback
import warnings

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


class SyncSites:
    """Where the host waits for the GPU: CUDA's sync debug mode warns at every synchronizing call, and each
    warning is counted by its innermost frames outside torch. A site counted about once per step is a
    per-step stall; the trainer's own ones (the step log, each `logEverySteps`) show up as such too."""

    def __init__(self, frames: int = 4):
        self.frames, self.sites = frames, {}

    def __enter__(self):
        self._cuda = torch.cuda.is_available()  # nothing to count without a GPU
        self._saved = warnings.showwarning, torch.cuda.get_sync_debug_mode() if self._cuda else 0
        self._filters = warnings.catch_warnings()
        self._filters.__enter__()
        warnings.simplefilter("always")
        warnings.showwarning = self._show
        if self._cuda:
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def _show(self, message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return self._saved[0](message, category, filename, lineno, file, line)
        where = lambda frames: " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}"  # noqa: E731
                                           for f in reversed(frames))
        stack = [f for f in traceback.extract_stack()[:-1] if "/warnings" not in f.filename]
        ours = [f for f in stack if "/torch/" not in f.filename]
        key = f"[{threading.current_thread().name}] {where(stack[-2:])} | {where(ours[-self.frames:])}"
        self.sites[key] = self.sites.get(key, 0) + 1

    def __exit__(self, *exc):
        if self._cuda:
            torch.cuda.set_sync_debug_mode(self._saved[1])
        warnings.showwarning = self._saved[0]
        self._filters.__exit__(*exc)

    def most_common(self, n: int = 20) -> list[tuple[str, int]]:
        return sorted(self.sites.items(), key=lambda kv: -kv[1])[:n]
