"""Prometheus metrics of one training run, served by global rank 0.

Job identity (TrainingJob name, namespace, pod) comes from the scrape target's labels (PodMonitor
relabelling of the `kubetrain.io/job-name` pod label), so no metric here carries it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kubetrain.contracts import TrainerMetric as M



class TrainerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        self.step = gauge(M.STEP, "Optimizer steps completed.")
        self.total_steps = gauge(M.TOTAL_STEPS, "Optimizer steps the run will take.")
        self.epoch = gauge(M.EPOCH, "Current epoch (0-based, fractional).")
        self.loss = gauge(M.LOSS, "Training loss, mean over the last logging window, all ranks.")
        self.learning_rate = gauge(M.LEARNING_RATE, "Learning rate of the last step.")
        self.grad_norm = gauge(M.GRAD_NORM, "Global gradient L2 norm before clipping, last step.")
        self.samples_per_second = gauge(M.SAMPLES_PER_SECOND, "Training samples per second, all ranks.")
        self.tokens_per_second = gauge(M.TOKENS_PER_SECOND, "Real (non-pad) training tokens per second, all ranks.")
        self.padding_ratio = gauge(M.PADDING_RATIO, "Pad tokens / tokens fed to the model, last window.")
        self.model_flops = gauge(M.MODEL_FLOPS, "Model FLOP/s achieved, all ranks: training FLOPs per real token "
                                 "(matmul parameters, see step_log.model_flops_per_token) x real tokens/s.")
        # Labelled, so it is absent (not 0) where the peak is unknown: CPUs and GPUs not in step_log.PEAK_TFLOPS.
        self.mfu = gauge(M.MFU, "Model FLOPs utilisation: model FLOP/s / (dense bf16 peak FLOP/s of the device x "
                         "world size); only where the device's peak is known.", ("device",))
        self.eta_seconds = gauge(M.ETA_SECONDS, "Estimated seconds to the last step.")
        self.goodput = gauge(M.GOODPUT, "Productive training time / wall time since the job first started.")
        self.eval_metric = gauge(M.EVAL_METRIC, "Latest evaluation metrics (eval_loss, eval_f1, ...).", ("metric",))
        self.last_checkpoint_step = gauge(M.LAST_CHECKPOINT_STEP, "Step of the newest complete checkpoint.")
        self.last_checkpoint_timestamp = gauge(M.LAST_CHECKPOINT_TIMESTAMP, "Unix time of the newest complete checkpoint.")
        self.checkpoint_bytes = gauge(M.CHECKPOINT_BYTES, "Size of the newest complete checkpoint.")
        # Checkpoints are minutes apart: a rate() over a dashboard interval is NaN between two of them, so the
        # newest one's durations are a gauge too (the histogram stays, for percentiles over long windows).
        self.last_checkpoint_duration = gauge(M.LAST_CHECKPOINT_DURATION, "Durations of the newest complete "
                                              "checkpoint, by phase: stall (training blocked) or upload.", ("phase",))
        self.checkpoint_duration = Histogram(
            M.CHECKPOINT_DURATION,
            "Checkpoint time from snapshot to manifest, by phase: stall (training blocked) or upload.",
            ("phase",),
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.checkpoints = Counter(M.CHECKPOINTS, "Checkpoints completed, by reason.", ("reason",), registry=r)
        self.checkpoint_failures = Counter(M.CHECKPOINT_FAILURES, "Checkpoint saves that failed after retries.", registry=r)
        self.checkpoint_retries = Counter(M.CHECKPOINT_RETRIES, "Checkpoint storage requests that failed and are "
                                          "being retried (storage refusing or unreachable).", registry=r)
        self.tracking_errors = Counter(M.TRACKING_ERRORS, "MLflow tracking requests that failed and are being retried "
                                       "(spec.tracking.mlflow unreachable or refusing).", registry=r)
        self.checkpoints_superseded = Counter(M.CHECKPOINTS_SUPERSEDED, "Snapshots dropped unwritten for a newer "
                                              "one, because storage was slower than checkpoint.everySteps.", registry=r)
        self.samples = Counter(M.SAMPLES, "Training samples processed, all ranks.", registry=r)
        self.tokens = Counter(M.TOKENS, "Real training tokens processed, all ranks.", registry=r)
        self.resumed_from_step = gauge(M.RESUMED_FROM_STEP, "Step this process resumed from (0: fresh start).")
        self.world_size = gauge(M.WORLD_SIZE, "Training processes in the group.")
        self.started_from = gauge(M.STARTED_FROM, "Step this run started at; labels: the checkpoint it resumed (empty: "
                                  "from scratch), why, and the settings changed since that checkpoint.",
                                  ("checkpoint", "why", "changed"))

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Start the /metrics HTTP server in a daemon thread; returns (server, thread)."""
        return start_http_server(port, addr=addr, registry=self.registry)
