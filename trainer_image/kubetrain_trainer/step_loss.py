"""One micro-batch's summed loss, as train_step and the captured step graphs both compute it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .tasks import Task


def micro_batch_loss(module: torch.nn.Module, batch: dict[str, torch.Tensor], *, task: Task, autocast: Callable,
                     loss_fn: Callable | None = None) -> torch.Tensor:
    """The forward under `autocast`, then the task's summed loss over the logits; or, with `loss_fn`
    (training.fusedLoss), the forward's own loss, the logits never whole. `batch` keeps its labels."""
    batch = dict(batch)
    labels = batch.pop("labels", None)
    with autocast():
        if loss_fn is not None:
            return loss_fn(module, batch, labels)[0]
        logits = module(**batch).logits
    return task.summed_loss(logits, batch, labels)[0]
