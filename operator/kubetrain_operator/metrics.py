"""The operator's own Prometheus metrics (trainer metrics are served by the trainer pods)."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kubetrain.contracts import OperatorMetric as M
from kubetrain.contracts import Phase

ERROR_KINDS = ("conflict", "api", "internal")
PHASES = tuple(Phase)
RESTART_REASONS = ("preemption", "failure")


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Gauge(M.JOBS, "TrainingJobs by phase", ["phase"], registry=r)
        self.restarts = Counter(M.RESTARTS, "Group restarts, by cause", ["reason"], registry=r)
        self.preemptions = Counter(M.PREEMPTIONS, "Group restarts caused by a preemption", registry=r)
        self.reconcile_seconds = Histogram(M.RECONCILE_DURATION, "Time per reconcile",
                                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.errors = Counter(M.RECONCILE_ERRORS, "Reconciles that raised", ["kind"], registry=r)
        self.transitions = Counter(M.PHASE_TRANSITIONS, "Phase transitions", ["phase"], registry=r)
        self.leader = Gauge(M.LEADER, "1 on the replica that reconciles (the leader, or the only one), 0 on a standby",
                            registry=r)
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        # Every known label value exported from the start, at 0: increase()/rate() then see the first
        # event (a counter that appears at 1 has no increase), and alerts and dashboards have a series.
        for phase in PHASES:
            self.jobs.labels(phase).set(0)
            self.transitions.labels(phase)
        for reason in RESTART_REASONS:
            self.restarts.labels(reason)
        for kind in ERROR_KINDS:  # rate() misses the first error of a series born at 1
            self.errors.labels(kind)

    def observe_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """Record a job's phase (None: the job is gone); keeps the by-phase gauge exact.

        Transitions are counted apart (`transition`), from status changes the operator made itself:
        a restarted operator re-learning existing phases must not look like jobs failing again.
        """
        with self._lock:
            key = (namespace, name)
            before = self._phases.get(key)
            if phase is None:
                self._phases.pop(key, None)
            else:
                self._phases[key] = phase
            if before != phase:
                counts = {p: 0 for p in PHASES}
                for p in self._phases.values():
                    counts[p] = counts.get(p, 0) + 1
                for p, n in counts.items():
                    self.jobs.labels(p).set(n)

    def transition(self, phase: str) -> None:
        self.transitions.labels(phase).inc()

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
