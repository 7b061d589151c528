"""Evaluation: the task's metrics (accuracy/precision/recall/F1, or loss and perplexity), exact over all ranks.

Each rank evaluates its share of the batches (under fsdp every rank runs as many forwards: an empty
batch is a one-sample forward that is not counted); the loss sums and the task's counts (a confusion
matrix for classification) are all-reduced in one collective, so the metrics are exact over the
whole eval set.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .data import Encoded, collate
from .distributed import all_reduce
from .tasks import Task


@torch.no_grad()
def evaluate(model: torch.nn.Module, encoded: Encoded, batches: list[list[int]], *, task: Task, num_labels: int,
             device: torch.device, autocast: Callable, pad_id: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    targets = torch.zeros((), dtype=torch.float64, device=device)
    counts = torch.zeros(task.eval_count_size(num_labels), dtype=torch.float64, device=device)
    for indices in batches:
        filler = not indices  # a sharded model's ranks run as many forwards; this one is not counted
        batch = {k: v.to(device, non_blocking=True) for k, v in collate(encoded, indices or [0], pad_id).items()}
        labels = batch.pop("labels", None)
        with autocast():
            logits = model(**batch).logits
        if filler:
            continue
        loss, count = task.summed_loss(logits, batch, labels)
        loss_sum += loss.double()
        targets += count
        counts += task.eval_counts(logits, labels, num_labels)
    totals = all_reduce(torch.cat([loss_sum.view(1), targets.view(1), counts]))  # one collective
    model.train(was_training)
    eval_loss = (totals[0] / totals[1].clamp(min=1)).item()
    return task.eval_metrics(eval_loss, totals[2:], num_labels)
