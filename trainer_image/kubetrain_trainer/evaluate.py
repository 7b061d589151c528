"""Evaluation: accuracy/precision/recall/F1 for classification, loss and perplexity for causal LM.

Each rank evaluates its share of the batches; counts (confusion matrix, loss sums) are all-reduced,
so the metrics are exact over the whole eval set.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .data import CLASSIFICATION, Encoded, collate
from .distributed import all_reduce
from .losses import summed_loss


@torch.no_grad()
def evaluate(model: torch.nn.Module, encoded: Encoded, batches: list[list[int]], *, task: str, num_labels: int,
             device: torch.device, autocast: Callable, pad_id: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    targets = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros((num_labels, num_labels), dtype=torch.float64, device=device)
    for indices in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in collate(encoded, indices, pad_id).items()}
        labels = batch.pop("labels", None)
        with autocast():
            logits = model(**batch).logits
        loss, count = summed_loss(logits, batch, labels, task)
        loss_sum += loss.double()
        targets += count
        if task == CLASSIFICATION:
            preds = logits.argmax(dim=-1)
            confusion.index_put_((labels, preds), torch.ones_like(preds, dtype=torch.float64), accumulate=True)
    totals = all_reduce(torch.cat([loss_sum.view(1), targets.view(1), confusion.flatten()]))  # one collective
    loss_sum, targets, confusion = totals[0], totals[1], totals[2:].view(num_labels, num_labels)
    model.train(was_training)
    eval_loss = (loss_sum / targets.clamp(min=1)).item()
    if task == CLASSIFICATION:
        return {"eval_loss": eval_loss, **classification_metrics(confusion.cpu())}
    return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 700.0))}


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """From a [true, predicted] count matrix: binary metrics of class 1, macro averages otherwise."""
    tp = confusion.diag()
    predicted = confusion.sum(dim=0)
    actual = confusion.sum(dim=1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(tp))
    pick = (lambda v: v[1].item()) if confusion.shape[0] == 2 else (lambda v: v.mean().item())
    return {
        "eval_accuracy": (tp.sum() / confusion.sum().clamp(min=1)).item(),
        "eval_precision": pick(precision),
        "eval_recall": pick(recall),
        "eval_f1": pick(f1),
    }
