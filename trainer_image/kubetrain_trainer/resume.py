"""Which checkpoint a run may resume, and what changed in the spec since it was written. One rule:

- The model's identity (spec.model: name, config, task, numLabels, tokenizer, lora) must match the
  checkpoint's, else the checkpoint is refused and the job fails naming it and the fields: its
  tensors belong to another model. A checkpoint written before identities were recorded is taken.
- Every other setting (learning rate, epochs, batch budget, data files, nodes...) may change between
  runs: the job's spec applies from the resumed step on, and each change is logged and reported
  (status.startedFrom.changed and an Event in a cluster), never silent.

checkpoint.resume: never resumes only this TrainingJob object's own checkpoints: they live under a
directory of its uid (api.checkpoint_prefix), so an earlier job of the same name is never loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from kubetrain.api import TrainingJobSpec

# The spec.model fields a checkpoint's tensors depend on.
IDENTITY_FIELDS = ("name", "config", "task", "num_labels", "tokenizer", "lora", "quantization")
# Settings recorded with each checkpoint and compared on resume (spec path -> value).
SETTING_FIELDS = {
    "training": ("epochs", "max_steps", "learning_rate", "weight_decay", "warmup_ratio", "warmup_steps", "schedule",
                 "precision", "gradient_accumulation", "batch_size", "max_grad_norm", "seed", "strategy", "activation_checkpointing"),
    "data": ("train", "eval", "max_length", "max_tokens_per_batch", "max_samples_per_batch", "packing", "style",
             "train_on"),
}


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.title() for w in rest)


def _plain(value):
    """A JSON-comparable form of a spec value (nested models as dicts)."""
    if hasattr(value, "model_dump"):
        value = value.model_dump(by_alias=True, exclude_none=True, mode="json")
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def model_identity(spec: TrainingJobSpec) -> dict:
    return {f"model.{_camel(f)}": _plain(getattr(spec.model, f)) for f in IDENTITY_FIELDS}


def run_settings(spec: TrainingJobSpec, world_size: int, accumulation: int | None = None) -> dict:
    found = {f"{section}.{_camel(f)}": _plain(getattr(getattr(spec, section), f))
             for section, fields in SETTING_FIELDS.items() for f in fields}
    found["worldSize"] = world_size
    found["microBatchesPerStep"] = world_size * (accumulation or spec.training.gradient_accumulation)
    return found


def accumulation_for(meta: dict | None, spec_accumulation: int, world_size: int) -> tuple[int, str | None]:
    """The gradient accumulation a resumed run uses, and why if it is not the spec's.

    A step is a fixed number of the plan's micro-batches (world size x accumulation). When only the
    world size changed since the checkpoint (a node lost, or added), accumulating so that a step takes
    the same micro-batches keeps everything a step means: the same samples in the same steps (the
    data fingerprints match), the same step count, so the same learning-rate schedule.
    """
    settings = (meta or {}).get("settings")
    if not isinstance(settings, dict):
        return spec_accumulation, None
    was_world, was_accumulation = settings.get("worldSize"), settings.get("training.gradientAccumulation")
    micro = settings.get("microBatchesPerStep")
    if not isinstance(micro, int) and isinstance(was_world, int) and isinstance(was_accumulation, int):
        micro = was_world * was_accumulation
    if not isinstance(micro, int) or was_world == world_size or was_accumulation != spec_accumulation:
        return spec_accumulation, None
    if micro % world_size == 0:
        accumulation = micro // world_size
        return accumulation, (f"world size {was_world} -> {world_size}: gradient accumulation {accumulation} keeps "
                              f"{micro} micro-batches per step (the same samples per step, steps and learning-rate schedule)")
    return spec_accumulation, (f"world size {was_world} -> {world_size}: the checkpoint's {micro} micro-batches per step do "
                               f"not split over {world_size} processes; steps now take {world_size * spec_accumulation}, "
                               "so the step count and learning-rate schedule follow the remaining data")


def differences(recorded: dict, current: dict) -> list[str]:
    """'field old -> new' for every field whose value differs (fields one side lacks are skipped)."""
    return [f"{key} {json.dumps(recorded[key])} -> {json.dumps(current[key])}" for key in current
            if key in recorded and recorded[key] != current[key]]


def refusal(meta: dict, identity: dict) -> list[str]:
    """The identity fields in which a checkpoint's manifest differs from this job (empty: compatible)."""
    recorded = meta.get("identity")
    return differences(recorded, identity) if isinstance(recorded, dict) else []


@dataclass(frozen=True)
class Start:
    """Where this run started: a checkpoint (uri, step) or scratch, why, and what changed since."""

    step: int = 0
    checkpoint: str | None = None
    why: str = ""
    changed: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def apply_learning_rate(optimizer: torch.optim.Optimizer, scheduler, spec: TrainingJobSpec) -> None:
    """Make the job's learningRate and weightDecay the ones a resumed optimizer and schedule use.

    The restored LambdaLR keeps the base rates of the run that wrote the checkpoint; the schedule's
    shape (warmup, total steps) comes from this job already, as its lambda is rebuilt, not restored.
    """
    t = spec.training
    scheduler.base_lrs = [t.learning_rate for _ in optimizer.param_groups]
    for group, decays in zip(optimizer.param_groups, (True, False), strict=False):
        group["initial_lr"] = t.learning_rate
        group["weight_decay"] = t.weight_decay if decays else 0.0
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs
