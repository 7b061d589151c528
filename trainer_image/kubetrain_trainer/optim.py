"""Optimizer and learning-rate schedule (warmup, then linear, cosine or constant)."""

from __future__ import annotations

import math

import torch

from kubetrain.api import TrainingSpec


def build_optimizer(model: torch.nn.Module, spec: TrainingSpec, device: torch.device) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases and norms (standard for BERT/GPT)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused (CUDA and CPU kernels): one kernel per step, and it can skip a non-finite update on the device
    return torch.optim.AdamW(groups, lr=spec.learning_rate, fused=device.type in ("cuda", "cpu"))


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate for the step about to be taken (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def build_scheduler(optimizer: torch.optim.Optimizer, spec: TrainingSpec, total_steps: int):
    warmup = spec.warmup_steps if spec.warmup_steps is not None else math.ceil(spec.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total_steps, spec.schedule))
