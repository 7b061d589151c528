"""MLflow tracking (spec.tracking.mlflow), by rank 0, never in the way of training.

Every call to the tracking server runs on a thread of its own, in order, from a bounded queue: the
training thread only enqueues. A failed call is retried with backoff (1 s doubling to 60 s) until it
succeeds, counted in kubetrain_tracking_errors_total (alert KubetrainTrackingErrors) and logged
(the first failure and then one line a minute); a call the server refuses for good (a bad value) is
dropped with a warning. When the queue is full the oldest metrics are dropped first, and counted.

One job is one MLflow run, also across preemptions and restarts: its id is kept in the checkpoint
(TrainState.mlflow_run_id), and a group that starts before any checkpoint finds the run by the
TrainingJob's uid (tag kubetrain.uid). Params are the flattened effective spec; on a resume with
changed settings, params already logged keep their values (MLflow refuses changes) and each change is
a tag `kubetrain.changed.<param>`.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetrain.api import MlflowSpec, TrainingJob

from .failures import one_line

log = logging.getLogger("kubetrain.tracking")

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
BATCH = 100  # params per log_batch (MLflow's limit); metrics go per log step, well under its 1000
QUEUE_SIZE = 10_000
PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE", "BAD_REQUEST",
                   "PERMISSION_DENIED", "UNAUTHENTICATED"}


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested spec as MLflow params: dotted keys, scalars as text, lists as JSON."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    text = json.dumps(value) if isinstance(value, list) else str(value)
    return {prefix: text[:MAX_PARAM_CHARS]}


def described(err: Exception) -> str:
    return f"{type(err).__name__}: {one_line(err, 300)}"


def refused_for_good(err: Exception) -> bool:
    return getattr(err, "error_code", None) in PERMANENT_CODES


class Tracker:
    """The run's MLflow side. Methods return at once; `close` waits (bounded) for what is queued."""

    def __init__(self, spec: MlflowSpec, job: TrainingJob, *, run_id: str | None, attempt: str,
                 on_error: Callable[[], None] | None = None, on_run: Callable[[str], None] | None = None,
                 client=None, backoff_s: float = 1.0, max_backoff_s: float = 60.0):
        from mlflow.tracking import MlflowClient

        self.spec, self.job, self.attempt = spec, job, attempt
        self.client = client or MlflowClient(tracking_uri=spec.tracking_uri)
        self.run_id = run_id
        self.on_error, self.on_run = on_error, on_run
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.errors = self.dropped = 0
        self._queue: queue.Queue[tuple[str, Callable[[], None]] | None] = queue.Queue(QUEUE_SIZE)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._work, name="kubetrain-mlflow", daemon=True)
        self._submit("start", self._start)
        self._thread.start()

    # ------------------------------------------------------------------------ training thread

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        stamp = int(time.time() * 1000)
        self._submit("metrics", lambda: self._log_metrics(step, values, stamp))

    def finish(self, status: str, model_dir: Path | None = None) -> None:
        """The run's end: the exported model as an artifact (and its registration), then its status."""
        if model_dir is not None:
            self._submit("artifacts", lambda: self.client.log_artifacts(self.run_id, str(model_dir), "model"))
            if self.spec.register_model:
                self._submit("register", self._register)
        self._submit("status", lambda: self.client.set_terminated(self.run_id, status))

    def close(self, timeout: float = 60.0) -> None:
        """Wait up to `timeout` for what is queued, then stop (a server that stays down loses the rest)."""
        self._queue.put(None)
        self._thread.join(timeout)
        self._closing.set()
        if self._thread.is_alive():
            log.warning("mlflow: %s still unsent after %.0fs at exit; given up (%d errors so far)",
                        "requests" if self._queue.qsize() else "a request", timeout, self.errors)

    def _submit(self, kind: str, op: Callable[[], None]) -> None:
        while True:
            try:
                self._queue.put_nowait((kind, op))
                return
            except queue.Full:
                self._drop_oldest_metrics()

    def _drop_oldest_metrics(self) -> None:
        with self._queue.mutex:
            for i, item in enumerate(self._queue.queue):
                if item is not None and item[0] == "metrics":
                    del self._queue.queue[i]
                    self.dropped += 1
                    return
            self._queue.queue.popleft()  # nothing but control calls: the oldest goes
            self.dropped += 1

    # --------------------------------------------------------------------------- worker thread

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._call(*item)

    def _call(self, kind: str, op: Callable[[], None]) -> None:
        delay, last_log = self.backoff_s, 0.0
        while not self._closing.is_set():
            try:
                op()
                return
            except Exception as err:  # noqa: BLE001 - tracking never fails training
                if refused_for_good(err):
                    log.warning("mlflow: %s refused by %s, dropped: %s", kind, self.spec.tracking_uri, described(err))
                    return
                self.errors += 1
                if self.on_error:
                    self.on_error()
                if time.monotonic() - last_log > 60:
                    log.warning("mlflow: %s to %s failed (retrying with backoff, training goes on): %s", kind,
                                self.spec.tracking_uri, described(err))
                    last_log = time.monotonic()
                if self._closing.wait(delay):
                    return
                delay = min(2 * delay, self.max_backoff_s)

    def _start(self) -> None:
        """The job's run: the checkpoint's, else the one tagged with this TrainingJob's uid, else a new one."""
        meta = self.job.metadata
        experiment = self.client.get_experiment_by_name(self.spec.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.spec.experiment)
        run = None
        if self.run_id:
            run = self.client.get_run(self.run_id)
        elif meta.uid:
            found = self.client.search_runs([experiment_id], filter_string=f"tags.`kubetrain.uid` = '{meta.uid}'",
                                            max_results=1)
            run = found[0] if found else None
        tags = {"kubetrain.namespace": meta.namespace, "kubetrain.job": meta.name, "kubetrain.uid": meta.uid or "",
                "kubetrain.attempt": self.attempt}
        if run is None:
            run = self.client.create_run(experiment_id, run_name=self.spec.run_name or meta.name, tags=tags)
            log.info("mlflow: run %s in experiment %r at %s", run.info.run_id, self.spec.experiment, self.spec.tracking_uri)
        else:
            log.info("mlflow: continuing run %s", run.info.run_id)
        self.run_id = run.info.run_id
        if self.on_run:
            self.on_run(self.run_id)
        from mlflow.entities import Param, RunTag

        logged = dict(run.data.params)
        params = flatten(self.job.spec.model_dump(mode="json", by_alias=True, exclude_none=True))
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        changed = [RunTag(f"kubetrain.changed.{k}", f"{logged[k]} -> {v}"[:MAX_PARAM_CHARS])
                   for k, v in params.items() if k in logged and logged[k] != v]
        run_tags = [RunTag(k, v) for k, v in tags.items()] + changed
        for i in range(0, max(len(new), len(run_tags)), BATCH):
            self.client.log_batch(self.run_id, params=new[i:i + BATCH], tags=run_tags[i:i + BATCH])

    def _log_metrics(self, step: int, values: dict[str, float], stamp: int) -> None:
        from mlflow.entities import Metric

        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in values.items()])

    def _register(self) -> None:
        name = self.spec.register_model
        try:
            self.client.create_registered_model(name)
        except Exception as err:  # noqa: BLE001
            if getattr(err, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/model"
        if self.client.search_model_versions(f"name = '{name}' and run_id = '{self.run_id}'"):
            log.info("mlflow: %s already has this run's model (a finished job's group ran again)", name)
            return
        version = self.client.create_model_version(name, source, run_id=self.run_id)
        log.info("mlflow: registered %s version %s (%s)", name, version.version, source)


def start_tracking(job: TrainingJob, run_id: str | None, on_error, on_run) -> Tracker | None:
    spec = job.spec.tracking.mlflow
    if spec is None:
        return None
    # our own retries (on the tracker's thread) govern: MLflow's client would retry each request for minutes
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    return Tracker(spec, job, run_id=run_id, attempt=os.environ.get("KUBETRAIN_ATTEMPT", "0"), on_error=on_error,
                   on_run=on_run)
