"""The divergence guard: a step whose loss or gradient norm is NaN/Inf is never applied, and the job stops.

Checking every step on the host would stall the GPU queue, so the guard keeps its counts on the
device and the host reads them only where it syncs anyway: at log steps and before a checkpoint.
A non-finite step's update is skipped on the device (fused AdamW's found_inf: no weight, moment or
step-count change), so the state a checkpoint would save is always the last good one. Under fp16 the
grad scaler already skips steps whose gradients overflowed; those are its normal work, not divergence.

training.onNonFinite: fail (default) stops the job, reason Diverged, naming the first bad step;
skip goes on until more than training.nonFiniteSkipLimit steps were skipped.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from kubetrain.api import TrainingSpec

from .checkpoint_state import TrainState
from .distributed import all_reduce
from .failures import Diverged

log = logging.getLogger("kubetrain.divergence")


@contextlib.contextmanager
def update_skipped_if_non_finite(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor,
                                 flag: torch.Tensor | None = None):
    """Around `optimizer.step()`: a fused optimizer skips the whole update when the norm is not finite.

    `flag` is a static tensor to hold the decision (a captured CUDA graph reads it by address). A
    non-fused optimizer cannot skip on the device; the guard still stops the run at its next check.
    """
    if not optimizer.defaults.get("fused"):
        yield
        return
    found = (~torch.isfinite(grad_norm)).to(torch.float32)
    if flag is not None:
        flag.copy_(found)
        found = flag
    optimizer.found_inf = found  # read by fused Adam(W).step, as GradScaler passes it
    try:
        yield
    finally:
        del optimizer.found_inf


class NonFiniteGuard:
    def __init__(self, spec: TrainingSpec, state: TrainState, device: torch.device, scaler_enabled: bool):
        self.spec, self.state, self.scaler_enabled = spec, state, scaler_enabled
        self.bad = torch.zeros((), dtype=torch.int64, device=device)  # non-finite steps since the last check
        self.first = torch.full((), -1, dtype=torch.int64, device=device)  # the first of them (-1: none)

    def record(self, step: int, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """After the optimizer step numbered `step` (1-based); no host sync."""
        bad = ~torch.isfinite(loss_sum.detach().float())
        if not self.scaler_enabled:  # under fp16 an overflowed gradient is the scaler's skipped step
            bad |= ~torch.isfinite(grad_norm.detach().float())
        self.bad += bad
        self.first.copy_(torch.where(bad & (self.first < 0), step, self.first))

    def check(self) -> None:
        """Collective (every rank at the same step): raise Diverged past what onNonFinite allows."""
        found = all_reduce(torch.stack([self.bad, torch.where(self.first < 0, -(1 << 62), -self.first)]),
                           op=torch.distributed.ReduceOp.MAX).tolist()
        bad, first = int(found[0]), -int(found[1])
        if bad == 0:
            return
        self.bad.zero_()
        self.first.fill_(-1)
        where = "loss or gradient norm" if not self.scaler_enabled else "loss"
        if self.spec.on_non_finite == "fail":
            raise Diverged(f"non-finite {where} at step {first} (training.onNonFinite: fail); the update was not "
                           "applied and no checkpoint holds it: the newest checkpoint is the last good state")
        self.state.non_finite_skips += bad
        if self.state.non_finite_skips > self.spec.non_finite_skip_limit:
            raise Diverged(f"{self.state.non_finite_skips} steps with a non-finite {where}, the latest from step {first}, "
                           f"over training.nonFiniteSkipLimit {self.spec.non_finite_skip_limit}")
        log.warning("skipped %d step(s) with a non-finite %s (first: step %d); %d of %d allowed skips used", bad, where,
                    first, self.state.non_finite_skips, self.spec.non_finite_skip_limit)
