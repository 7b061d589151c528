"""What a checkpoint holds: a registry of Stateful components, one file each, built by the composition root.

A component has `state_dict()` and `load_state_dict(state)` (torch's Stateful protocol, which
torch.distributed.checkpoint also speaks). Under DDP every component is local: any rank holds the
whole state (the RNG streams are no state: distributed.seed_step), so a survivor can save it alone
when a peer died (the rescue checkpoint). Rank 0 writes what it returns. A file name ending in `.json` is written as
JSON, any other with torch.save and read back with `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from .model import load_trainable_state, trainable_state_dict

class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclasses.dataclass
class TrainState:
    """Loop position and bookkeeping that must survive a restart."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0  # micro-batches of `epoch` already consumed
    samples_seen: int = 0
    tokens_seen: int = 0
    productive_seconds: float = 0.0  # time inside training steps, over all restarts
    first_start_time: float = dataclasses.field(default_factory=time.time)
    best_metric: float | None = None
    best_step: int | None = None  # the step of best_metric's evaluation
    mlflow_run_id: str | None = None  # spec.tracking.mlflow: one run for the whole job, across restarts
    evals_without_improvement: int = 0
    last_eval: dict[str, float] = dataclasses.field(default_factory=dict)
    non_finite_skips: int = 0  # steps skipped under training.onNonFinite: skip

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            setattr(self, name, value)


class ModelWeights:
    """The trained weights: all of them, or only what LoRA trains (the frozen base is rebuilt from spec.model)."""

    def __init__(self, model: torch.nn.Module, lora: bool):
        self.model, self.lora = model, lora

    def state_dict(self) -> dict[str, torch.Tensor]:
        return trainable_state_dict(self.model, self.lora)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(self.model, state, self.lora)


class Group:
    """Several components in one file, under their names (e.g. scheduler, scaler and RNG in training.pt)."""

    def __init__(self, **parts: Stateful):
        self.parts = parts

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Parts the file has no entry for keep their state; entries without a part (an older
        checkpoint's "rng": streams are seeded per step now) are ignored."""
        for name, part in self.parts.items():
            if name in state:
                part.load_state_dict(state[name])


class CheckpointContent:
    """The registry: file name -> component. The composition root registers; the checkpointer saves and loads."""

    def __init__(self) -> None:
        self._files: dict[str, Stateful] = {}

    def register(self, file: str, component: Stateful) -> None:
        if file in self._files:
            raise ValueError(f"checkpoint file {file!r} registered twice")
        self._files[file] = component

    def __iter__(self) -> Iterator[tuple[str, Stateful]]:
        return iter(self._files.items())

    def state_dicts(self) -> dict[str, Any]:
        """Collective: every rank must call it. The values reference live tensors (snapshot them before training on)."""
        return {file: component.state_dict() for file, component in self}

    @staticmethod
    def write(file: str, state: Any, path: Path) -> None:
        if file.endswith(".json"):
            path.write_text(json.dumps(state, indent=1))
        else:
            torch.save(state, path)

    def load(self, paths: dict[str, Path]) -> None:
        """Load every registered component from its downloaded file, in registration order."""
        for file, component in self:
            if file.endswith(".json"):
                component.load_state_dict(json.loads(paths[file].read_text()))
            else:
                component.load_state_dict(torch.load(paths[file], map_location="cpu", weights_only=True))
