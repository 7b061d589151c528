"""Progress reporting (log line + metrics) and early stopping, kept out of the loop body."""

from __future__ import annotations

import logging
import time

import torch

from kubetrain.api import EarlyStoppingSpec

from .checkpoint import TrainState
from .data import StepBatches
from .distributed import Runtime, all_reduce
from .metrics import TrainerMetrics

log = logging.getLogger("kubetrain.progress")


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class ProgressLog:
    """Accumulates a logging window on device; one all-reduce per flush, none per step."""

    def __init__(self, rt: Runtime, metrics: TrainerMetrics | None, total_steps: int, state: TrainState):
        self.rt, self.metrics, self.total_steps, self.state = rt, metrics, total_steps, state
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.rt.device)
        self.targets = self.samples = self.tokens = self.padded = self.steps = 0
        self.window_start = time.perf_counter()

    def record(self, batches: StepBatches, loss_sum: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        self.loss_sum += loss_sum
        self.targets += batches.global_targets
        self.samples += batches.global_samples
        self.tokens += batches.global_tokens
        self.padded += batches.global_padded
        self.steps += 1
        self.grad_norm, self.lr = grad_norm, lr

    def flush(self, epoch: float) -> None:
        if self.steps == 0:
            return
        loss = all_reduce(self.loss_sum.detach().clone()).item() / max(1, self.targets)
        elapsed = max(1e-9, time.perf_counter() - self.window_start)
        step_time = elapsed / self.steps
        eta = step_time * (self.total_steps - self.state.step)
        wall = max(1e-9, time.time() - self.state.first_start_time)
        goodput = min(1.0, self.state.productive_seconds / wall)
        samples_s, tokens_s = self.samples / elapsed, self.tokens / elapsed
        grad_norm = float(self.grad_norm)
        if self.metrics:
            m = self.metrics
            m.step.set(self.state.step)
            m.epoch.set(epoch)
            m.loss.set(loss)
            m.learning_rate.set(self.lr)
            m.grad_norm.set(grad_norm)
            m.samples_per_second.set(samples_s)
            m.tokens_per_second.set(tokens_s)
            m.padding_ratio.set(1 - self.tokens / max(1, self.padded))
            m.eta_seconds.set(eta)
            m.goodput.set(goodput)
            m.samples.inc(self.samples)
            m.tokens.inc(self.tokens)
        if self.rt.is_main:
            pct = 100 * self.state.step / self.total_steps
            log.info("step %d/%d (%.0f%%) | epoch %.2f | loss %.4f | lr %.2e | grad %.2f | %.1f samples/s | %.0f tok/s | eta %s",
                     self.state.step, self.total_steps, pct, epoch, loss, self.lr, grad_norm, samples_s, tokens_s, format_duration(eta))
        self._reset()

    def report_eval(self, results: dict[str, float]) -> None:
        if self.metrics:
            for name, value in results.items():
                self.metrics.eval_metric.labels(name).set(value)
        if self.rt.is_main:
            log.info("eval at step %d | %s", self.state.step, " | ".join(f"{k} {v:.4f}" for k, v in results.items()))


class EarlyStopping:
    """Stop after `patience` evaluations without improvement; its counters live in TrainState."""

    def __init__(self, spec: EarlyStoppingSpec | None, state: TrainState):
        self.spec, self.state = spec, state
        if spec is not None:
            self.minimize = spec.mode == "min" or (spec.mode == "auto" and spec.metric.endswith(("loss", "perplexity")))

    def update(self, results: dict[str, float]) -> None:
        if self.spec is None:
            return
        if self.spec.metric not in results:
            raise ValueError(f"spec.training.earlyStopping.metric: {self.spec.metric!r} is not computed; "
                             f"available: {sorted(results)}")
        value, best = results[self.spec.metric], self.state.best_metric
        improved = best is None or (best - value > self.spec.min_delta if self.minimize else value - best > self.spec.min_delta)
        if improved:
            self.state.best_metric, self.state.evals_without_improvement = value, 0
        else:
            self.state.evals_without_improvement += 1

    @property
    def should_stop(self) -> bool:
        return self.spec is not None and self.state.evals_without_improvement >= self.spec.patience
