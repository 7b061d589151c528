"""The whole training step as one CUDA graph per batch shape (`training.compile: reduce-overhead`).

At small batches a step is bound by the host: ~1,000 kernel launches, autograd's per-parameter
bookkeeping, the optimizer's and the clipping's Python, torch.compile's guards. Captured once, a step
is one `replay()`: forward, loss, backward, gradient clipping and the fused AdamW update, with the
learning rate and the loss scale read from device tensors the host fills before each replay.

Exactness: capture needs real warm-up steps (they compile and allocate the optimizer state). They run
on a snapshot: parameters, optimizer state and RNG states are put back afterwards, so training with
graphs starts (and resumes) from exactly the state it would have without them.

Memory: all graphs share one pool. Nothing a graph allocates is read after its replay ends (inputs,
the loss and the grad norm live outside the pool), so replaying graphs in any order is safe.

Limits (else `compile.py` uses plain torch.compile): one CUDA device, no DDP, gradient accumulation 1,
bf16 or fp32 (fp16's GradScaler checks for inf on the host). A step whose shape was not captured is
captured on first sight; a step with other than one micro-batch falls back to the eager path.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Hashable

import numpy as np
import torch

from .batching import DeviceBatcher
from .clipping import clip_gradients, divided_in_update
from .divergence import update_skipped_if_non_finite
from .step_loss import micro_batch_loss
from .tasks import Task

log = logging.getLogger("kubetrain.graphs")


class StepGraphs:
    """Replays the captured training step of a batch's shape."""

    WARMUP_STEPS = 2  # eager runs of a new shape before capture: compile, cuBLAS/autograd lazy init

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, *, task: Task, autocast_dtype,
                 max_grad_norm: float | None, device: torch.device, loss_fn: Callable | None = None):
        self.module, self.optimizer, self.task, self.device = module, optimizer, task, device
        self.loss_fn = loss_fn  # training.fusedLoss: the forward computes the loss (step_loss.micro_batch_loss)
        self.autocast_dtype = autocast_dtype  # None: fp32
        self.max_grad_norm = max_grad_norm if max_grad_norm is not None else float("inf")
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.inputs: dict[tuple, dict[str, torch.Tensor]] = {}
        # read by every graph, written by the host before a replay
        self.scale = torch.ones((), device=device)
        self.lrs = [torch.tensor(float(g["lr"]), device=device) for g in optimizer.param_groups]
        # written by every graph, read after its replay
        self.loss = torch.zeros((), device=device)
        self.grad_norm = torch.zeros((), device=device)
        self.found_inf = torch.zeros((), device=device)  # written and read inside the graph: skip a non-finite update

    @staticmethod
    def key(batch: dict[str, torch.Tensor]) -> tuple:
        return tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()))

    def prepare(self, batcher: DeviceBatcher, samples: list[list[int]]) -> None:
        """Capture the step for each batch in `samples` (sample indices; one per batch shape)."""
        new = [b for b in map(batcher, samples) if self.key(b) not in self.graphs]
        if not new:
            return
        started = time.monotonic()
        with self._state_restored_afterwards():
            for batch in new:
                if self.key(batch) not in self.graphs:
                    self._capture(batch)
        log.info("graphs: captured the training step for %d batch shape(s) in %.1fs (%d in all)", len(new),
                 time.monotonic() - started, len(self.graphs))

    def step(self, batch: dict[str, torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on `batch`; returns (summed loss, grad norm) as fresh device tensors."""
        key = self.key(batch)
        if key not in self.graphs:
            started = time.monotonic()
            with self._state_restored_afterwards():
                self._capture(batch)
            log.info("graphs: captured a new batch shape %s in %.1fs", dict(key), time.monotonic() - started)
        for name, tensor in self.inputs[key].items():
            tensor.copy_(batch[name], non_blocking=True)
        self.scale.fill_(scale)
        for lr, group in zip(self.lrs, self.optimizer.param_groups, strict=True):
            lr.fill_(group["lr"])  # the scheduler sets floats; the graph reads the tensor
        self.graphs[key].replay()
        return self.loss.clone(), self.grad_norm.clone()

    # --- capture

    def _autocast(self):
        return torch.autocast("cuda", dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None,
                              cache_enabled=False)  # autocast's weight cache must not outlive a capture

    def _body(self, inputs: dict[str, torch.Tensor]) -> None:
        loss = micro_batch_loss(self.module, inputs, task=self.task, autocast=self._autocast, loss_fn=self.loss_fn)
        (loss * self.scale).backward()
        # as train_step clips (clipping.py): the divisor is computed in the graph, read only inside it
        norm, divisor = clip_gradients(self.optimizer, self.params, self.max_grad_norm, scaler_enabled=False)
        with update_skipped_if_non_finite(self.optimizer, norm, self.found_inf), divided_in_update(self.optimizer, divisor):
            self.optimizer.step()
        self.loss.copy_(loss.detach())
        self.grad_norm.copy_(norm)

    def _capture(self, batch: dict[str, torch.Tensor]) -> None:
        key = self.key(batch)
        inputs = {name: t.clone() for name, t in batch.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_STEPS):
                self.optimizer.zero_grad(set_to_none=True)
                self._body(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)  # backward allocates the gradients in the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._body(inputs)
        self.optimizer.zero_grad(set_to_none=True)  # the pool may reuse them: only the graph uses them
        self.graphs[key], self.inputs[key] = graph, inputs

    @contextlib.contextmanager
    def _state_restored_afterwards(self):
        """Parameters, optimizer state and RNG states as they were; the optimizer made capturable meanwhile."""
        opt = self.optimizer
        torch.cuda.synchronize(self.device)
        params = [p.detach().clone() for p in self.params]
        state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                 for p in self.params if opt.state.get(p)}
        rng = torch.get_rng_state(), torch.cuda.get_rng_state(self.device)
        groups = [(group["lr"], group.get("capturable", False)) for group in opt.param_groups]
        for lr, group in zip(self.lrs, opt.param_groups, strict=True):
            lr.fill_(group["lr"])
            group["lr"], group["capturable"] = lr, True  # in place, so the graph reads what step() fills
        try:
            yield
        finally:
            torch.cuda.synchronize(self.device)
            for group, (lr, capturable) in zip(opt.param_groups, groups, strict=True):
                group["lr"], group["capturable"] = lr, capturable
            with torch.no_grad():
                for p, saved in zip(self.params, params, strict=True):
                    p.copy_(saved)
                for p in self.params:  # in place: the graphs hold these tensors' addresses
                    before = state.get(p, {})
                    for k, v in opt.state[p].items():
                        if torch.is_tensor(v):
                            v.copy_(before[k]) if k in before else v.zero_()  # absent before: a fresh state is zeros
            torch.set_rng_state(rng[0])
            torch.cuda.set_rng_state(rng[1], self.device)


def one_batch_per_shape(shape: Callable[[list[int]], Hashable], batches: list[list[int]]) -> list[list[int]]:
    """The first of `batches` (e.g. an epoch's plan) with each shape: captured up front, none is met later."""
    first: dict[Hashable, list[int]] = {}
    for batch in batches:
        first.setdefault(shape(batch), batch)
    return list(first.values())


def one_sample_per_shape(batcher: DeviceBatcher, width: Callable[[int], int]) -> list[list[int]]:
    """A one-sample batch for every padded width the data can produce (filler rows complete each)."""
    widths: dict[int, int] = {}
    for i in np.argsort(batcher.lengths, kind="stable"):
        widths.setdefault(width(int(batcher.lengths[i])), int(i))
    return [[i] for _, i in sorted(widths.items())]
