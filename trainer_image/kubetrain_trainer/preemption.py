"""SIGTERM handling: finish the current step, agree across ranks, checkpoint, exit EXIT_PREEMPTED (75).

Kubernetes sends SIGTERM to a pod's PID 1 (our launcher, which runs torchrun, which forwards it to
the workers). Ranks may see the signal at different steps, so the decision to stop is all-reduced
each step: every rank stops after the same step and takes part in the emergency checkpoint.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger("kubetrain.preemption")


class StopSignal:
    """Records SIGTERM/SIGINT instead of dying mid-step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._cpu_group = None

    def install(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, _frame) -> None:
        if self.received is None:
            log.warning("received %s: stopping after the current step", signal.Signals(signum).name)
        self.received = signum

    def agreed(self, device: torch.device) -> bool:
        """True on every rank once any rank has been signalled (one tiny all-reduce per step).

        The flag travels on the CPU (gloo), never through the GPU: reading a GPU result would make the
        host wait for the step's kernels every step, and the next step could not be queued meanwhile.
        """
        if not dist.is_initialized():
            return self.received is not None
        if self._cpu_group is None:  # every rank reaches its first check at the same step
            self._cpu_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._cpu_group)
        return bool(flag.item())
