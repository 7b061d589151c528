"""The periodic reconcile of every known TrainingJob (deadlines, TTLs, live progress), without kopf timers.

A kopf timer makes kopf put its finalizer on every TrainingJob, and a delete that lands while a timer's
reconcile runs then waits for kopf's cancellation polling (60 s by default). The operator needs no
finalizer: owner references make the garbage collector delete a job's pods, Service, ConfigMap and
Secret. So this thread reconciles each known job again on a cadence (sooner when a plan asks), and a
deleted job drops out: its reconcile finds no object.

The cadence adapts to how many jobs there are (`cadence`): every 10 s while few run, stretched so that all
of them together cost about `LOOKS_PER_SECOND`, never more than 2 minutes apart, and jittered so that
jobs created together do not come due together.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("kubetrain.rechecks")
JobKey = tuple[str, str]
TICK_SECONDS = 0.25
MIN_INTERVAL_S = 10.0  # how old a running job's status.progress gets while few jobs run
MAX_INTERVAL_S = 120.0  # ... and however many run
LOOKS_PER_SECOND = 1.5  # the periodic looks' budget, all jobs together, between those bounds
JITTER = 0.2


def cadence(jobs: int, draw: float) -> float:
    """Seconds until a job's next periodic look while `jobs` jobs are known; `draw` in [0, 1) jitters it by ±20%."""
    base = min(MAX_INTERVAL_S, max(MIN_INTERVAL_S, jobs / LOOKS_PER_SECOND))
    return base * (1 - JITTER + 2 * JITTER * draw)


class Rechecks:
    def __init__(self, reconcile: Callable[[str, str], float | None],
                 interval: Callable[[int], float] = lambda jobs: cadence(jobs, random.random()), workers: int = 8):
        """`reconcile(namespace, name)` -> seconds until the next look at the latest (math.inf: nothing sooner
        than the cadence), or None when the job is gone; `interval(known jobs)` -> the cadence."""
        self.reconcile, self.interval = reconcile, interval
        self._due: dict[JobKey, float] = {}
        self._running: set[JobKey] = set()
        self._dropped: set[JobKey] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kubetrain-recheck")
        self._thread = threading.Thread(target=self._loop, name="kubetrain-rechecks", daemon=True)

    def track(self, key: JobKey, after: float | None = None) -> None:
        """Look at `key` again `after` seconds from now (default: the cadence); a sooner wish wins."""
        regular = self.interval(len(self._due) + len(self._running))
        due = time.monotonic() + (regular if after is None else min(after, regular))
        with self._lock:
            self._due[key] = min(due, self._due.get(key, due))

    def forget(self, key: JobKey) -> None:
        with self._lock:
            self._due.pop(key, None)
            if key in self._running:
                self._dropped.add(key)  # its recheck in flight must not schedule another

    def known(self) -> set[JobKey]:
        with self._lock:
            return set(self._due) | set(self._running)

    def start(self) -> Rechecks:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            now = time.monotonic()
            with self._lock:
                ready = [k for k, due in self._due.items() if due <= now and k not in self._running]
                for key in ready:
                    del self._due[key]
                    self._running.add(key)
            for key in ready:
                try:
                    self._pool.submit(self._one, key)
                except RuntimeError:  # shut down
                    return

    def _one(self, key: JobKey) -> None:
        after: float | None = math.inf
        try:
            after = self.reconcile(*key)
        except Exception:  # noqa: BLE001 - the reconcile logs and counts its own errors; look again later
            log.debug("recheck of %s/%s failed", *key, exc_info=True)
        finally:
            with self._lock:
                self._running.discard(key)
                if key in self._dropped:
                    self._dropped.discard(key)
                    after = None
        if after is not None:
            self.track(key, after)
