"""The step log (log line + metrics of each logging window) and early stopping, kept out of the loop body."""

from __future__ import annotations

import hashlib
import logging
import os
import time

import torch

from kubetrain.api import EarlyStoppingSpec

from .checkpoint_state import TrainState
from .data import StepBatches
from .distributed import Runtime, all_reduce
from .metrics import TrainerMetrics

log = logging.getLogger("kubetrain.progress")  # the name users grep for


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


# Dense (no sparsity) bf16 tensor-core peak of one device, TFLOP/s, from NVIDIA's datasheets; the
# first key contained in torch.cuda.get_device_name() (lower-cased) wins, so specific names go first.
PEAK_TFLOPS = {
    "h100 nvl": 835.5, "h100 pcie": 756.5, "h100": 989.5,  # "NVIDIA H100 80GB HBM3" is the SXM part
    "h200 nvl": 835.5, "h200": 989.5,
    "a100": 312.0,
}
PEAK_TFLOPS_ENV = "KUBETRAIN_PEAK_TFLOPS"  # override: the peak of a device not in the table


def peak_flops(device: torch.device) -> tuple[str, float] | None:
    """(device name, peak FLOP/s of one device), or None where unknown (CPU, GPUs not in the table)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    if override := os.environ.get(PEAK_TFLOPS_ENV):
        return name, float(override) * 1e12
    found = next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name.lower()), None)
    return (name, found * 1e12) if found else None


def model_flops_per_token(model: torch.nn.Module) -> float:
    """Training FLOPs per token: 2 (forward) + 2 (input gradients) per matmul weight, + 2 (weight
    gradient) per trainable one: 6N for full fine-tuning, about 4N with LoRA.

    Matmul weights are all parameters but embedding lookups (a tied output projection is a matmul).
    Attention scores (which grow with sequence length) are not counted, as in the usual 6N estimate.
    """
    lookups = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters(recurse=False)}
    try:
        output = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        output = None
    projected = {id(output.weight)} if getattr(output, "weight", None) is not None else set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in lookups and id(p) not in projected:
            continue
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return 4.0 * total + 2.0 * trainable


def window_fingerprint(steps: list[str]) -> str:
    """The data fingerprint of a logging window: the step's own for a one-step window (logEverySteps 1)."""
    return steps[0] if len(steps) == 1 else hashlib.blake2s("".join(steps).encode(), digest_size=4).hexdigest()


class StepLog:
    """Accumulates a logging window on device; one all-reduce per flush, none per step."""

    def __init__(self, rt: Runtime, metrics: TrainerMetrics | None, total_steps: int, state: TrainState,
                 model: torch.nn.Module | None = None):
        self.rt, self.metrics, self.total_steps, self.state = rt, metrics, total_steps, state
        self.tracker = None  # rank 0's MLflow tracker (tracking.py), when the job has one
        self.flops_per_token = model_flops_per_token(model) if model is not None else None
        self.peak = peak_flops(rt.device) if model is not None else None
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.rt.device)
        self.targets = self.samples = self.tokens = self.padded = self.steps = 0
        self.data: list[str] = []  # the window's step fingerprints
        self.window_start = time.perf_counter()

    def record(self, batches: StepBatches, loss_sum: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        self.loss_sum += loss_sum
        self.targets += batches.global_targets
        self.samples += batches.global_samples
        self.tokens += batches.global_tokens
        self.padded += batches.global_padded
        self.steps += 1
        self.data.append(batches.fingerprint)
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
            if self.flops_per_token:
                m.model_flops.set(self.flops_per_token * tokens_s)
                if self.peak:
                    device, peak = self.peak
                    m.mfu.labels(device).set(self.flops_per_token * tokens_s / (peak * self.rt.world_size))
            m.eta_seconds.set(eta)
            m.goodput.set(goodput)
            m.samples.inc(self.samples)
            m.tokens.inc(self.tokens)
        if self.tracker:
            self.tracker.log_metrics(self.state.step, {"train_loss": loss, "learning_rate": self.lr, "grad_norm": grad_norm,
                                                       "tokens_per_second": tokens_s, "samples_per_second": samples_s,
                                                       "epoch": epoch})
        if self.rt.is_main:
            pct = 100 * self.state.step / self.total_steps
            log.info("step %d/%d (%.0f%%) | epoch %.2f | loss %.4f | lr %.2e | grad %.2f | %.1f samples/s | %.0f tok/s | eta %s"
                     " | data %s", self.state.step, self.total_steps, pct, epoch, loss, self.lr, grad_norm, samples_s, tokens_s,
                     format_duration(eta), window_fingerprint(self.data))
        self._reset()

    def report_eval(self, results: dict[str, float]) -> None:
        if self.metrics:
            for name, value in results.items():
                self.metrics.eval_metric.labels(name).set(value)
        if self.tracker:
            self.tracker.log_metrics(self.state.step, results)
        if self.rt.is_main:
            log.info("eval at step %d | %s", self.state.step, " | ".join(f"{k} {v:.4f}" for k, v in results.items()))


class EarlyStopping:
    """Stop after `patience` evaluations without improvement; its counters live in TrainState."""

    def __init__(self, spec: EarlyStoppingSpec | None, state: TrainState):
        self.spec, self.state = spec, state
        if spec is not None:
            self.minimize = spec.mode == "min" or (spec.mode == "auto" and spec.metric.endswith(("loss", "perplexity")))

    def update(self, results: dict[str, float]) -> bool:
        """Count one evaluation; returns whether it is the best so far."""
        if self.spec is None:
            return False
        if self.spec.metric not in results:
            raise ValueError(f"spec.training.earlyStopping.metric: {self.spec.metric!r} is not computed; "
                             f"available: {sorted(results)}")
        value, best = results[self.spec.metric], self.state.best_metric
        improved = best is None or (best - value > self.spec.min_delta if self.minimize else value - best > self.spec.min_delta)
        if improved:
            self.state.best_metric, self.state.evals_without_improvement = value, 0
            self.state.best_step = self.state.step
        else:
            self.state.evals_without_improvement += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.spec is not None and self.state.evals_without_improvement >= self.spec.patience
