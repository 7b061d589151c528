"""Prometheus metrics of one training run, served by global rank 0.

Job identity (TrainingJob name, namespace, pod) comes from the scrape target's labels (PodMonitor
relabelling of the `kubetrain.io/job-name` pod label), so no metric here carries it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PREFIX = "kubetrain_"


class TrainerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=r)

        self.step = gauge("train_step", "Optimizer steps completed.")
        self.total_steps = gauge("train_total_steps", "Optimizer steps the run will take.")
        self.epoch = gauge("train_epoch", "Current epoch (0-based, fractional).")
        self.loss = gauge("train_loss", "Training loss, mean over the last logging window, all ranks.")
        self.learning_rate = gauge("learning_rate", "Learning rate of the last step.")
        self.grad_norm = gauge("grad_norm", "Global gradient L2 norm before clipping, last step.")
        self.samples_per_second = gauge("samples_per_second", "Training samples per second, all ranks.")
        self.tokens_per_second = gauge("tokens_per_second", "Real (non-pad) training tokens per second, all ranks.")
        self.padding_ratio = gauge("padding_ratio", "Pad tokens / tokens fed to the model, last window.")
        self.model_flops = gauge("model_flops_per_second", "Model FLOP/s achieved, all ranks: training FLOPs per real token "
                                 "(matmul parameters, see progress.model_flops_per_token) x real tokens/s.")
        # Labelled, so it is absent (not 0) where the peak is unknown: CPUs and GPUs not in progress.PEAK_TFLOPS.
        self.mfu = gauge("mfu_ratio", "Model FLOPs utilisation: model FLOP/s / (dense bf16 peak FLOP/s of the device x "
                         "world size); only where the device's peak is known.", ("device",))
        self.eta_seconds = gauge("eta_seconds", "Estimated seconds to the last step.")
        self.goodput = gauge("goodput_ratio", "Productive training time / wall time since the job first started.")
        self.eval_metric = gauge("eval_metric", "Latest evaluation metrics (eval_loss, eval_f1, ...).", ("metric",))
        self.last_checkpoint_step = gauge("last_checkpoint_step", "Step of the newest complete checkpoint.")
        self.last_checkpoint_timestamp = gauge("last_checkpoint_timestamp_seconds", "Unix time of the newest complete checkpoint.")
        self.checkpoint_bytes = gauge("checkpoint_bytes", "Size of the newest complete checkpoint.")
        self.checkpoint_duration = Histogram(
            PREFIX + "checkpoint_duration_seconds",
            "Checkpoint time from snapshot to manifest, by phase: stall (training blocked) or upload.",
            ("phase",),
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.checkpoints = Counter(PREFIX + "checkpoints", "Checkpoints completed, by reason.", ("reason",), registry=r)
        self.checkpoint_failures = Counter(PREFIX + "checkpoint_failures", "Checkpoint saves that failed after retries.", registry=r)
        self.checkpoint_retries = Counter(PREFIX + "checkpoint_retries", "Checkpoint storage requests that failed and are "
                                          "being retried (storage refusing or unreachable).", registry=r)
        self.checkpoints_superseded = Counter(PREFIX + "checkpoints_superseded", "Snapshots dropped unwritten for a newer "
                                              "one, because storage was slower than checkpoint.everySteps.", registry=r)
        self.samples = Counter(PREFIX + "train_samples", "Training samples processed, all ranks.", registry=r)
        self.tokens = Counter(PREFIX + "train_tokens", "Real training tokens processed, all ranks.", registry=r)
        self.resumed_from_step = gauge("resumed_from_step", "Step this process resumed from (0: fresh start).")
        self.world_size = gauge("world_size", "Training processes in the group.")

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Start the /metrics HTTP server in a daemon thread; returns (server, thread)."""
        return start_http_server(port, addr=addr, registry=self.registry)
