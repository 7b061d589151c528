"""Summed losses, so DDP steps can be weighted exactly by the step's global sample or token count."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import CLASSIFICATION


def summed_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], labels: torch.Tensor | None,
                task: str) -> tuple[torch.Tensor, torch.Tensor | int]:
    """(sum of per-target losses, number of targets): samples for classification, next tokens for LM.

    The LM count stays a tensor: reading it would force a host sync in the training loop. LM `labels`, when
    given (packed rows), are the target of each position already (-100: none); else they come from the ids.
    """
    if task == CLASSIFICATION:
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()
    if labels is not None:
        return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), reduction="sum"), (labels != -100).sum()
    targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    shifted = logits[:, :-1].float()
    loss = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum()
