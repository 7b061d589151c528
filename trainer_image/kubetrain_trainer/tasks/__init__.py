"""Tasks as plugins: what differs between sequence classification and causal LM, behind one protocol.

The loop, the data plan, evaluation, packing and the model builder ask the run's `Task`; none of
them branches on a task name. Adding a task means adding one module here and one name to
`spec.model.task`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    import numpy as np

    from kubetrain.api import DataSpec, ModelSpec

    from ..data import Encoded


class Task(Protocol):
    name: str  # spec.model.task
    peft_task_type: str  # peft.TaskType value

    def auto_model(self):
        """The transformers Auto class that builds the model."""

    def config_kwargs(self, spec: ModelSpec) -> dict:
        """Task settings of the model config (e.g. num_labels)."""

    def label_vocabulary(self, rows: Sequence[dict], data: DataSpec, model: ModelSpec, uri: str) -> dict[str, int] | None:
        """Raw label -> class id, from the training rows; None where there are no labels."""

    def encode(self, rows: Sequence[dict], tokenizer, data: DataSpec, uri: str, labels: dict[str, int] | None) -> Encoded:
        """Tokenize every row once; errors name the file, the row and the field."""

    def sample_targets(self, encoded: Encoded) -> np.ndarray:
        """How many loss targets each sample holds (the loss denominator of a step is their sum)."""

    def summed_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor],
                    labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | int]:
        """(sum of per-target losses, number of targets) of one micro-batch."""

    def eval_count_size(self, num_labels: int) -> int:
        """How many counts the eval metrics are computed from (a rank with no batch sends zeros)."""

    def eval_counts(self, logits: torch.Tensor, labels: torch.Tensor | None, num_labels: int) -> torch.Tensor:
        """Counts this batch adds to the eval metrics: float64, `eval_count_size` of them."""

    def eval_metrics(self, eval_loss: float, counts: torch.Tensor, num_labels: int) -> dict[str, float]:
        """The eval metrics from the loss and the counts summed over every batch and rank."""

    def check_packable(self, model_type: str) -> None:
        """Raise PackingError naming spec.data.packing if this model cannot train on packed rows."""

    def packed_forward(self, model: torch.nn.Module, input_ids, position_ids, sample_starts, varlen: dict):
        """Forward over one packed row; returns an object with `.logits`."""

    def loss_in_forward(self, model: torch.nn.Module, compiled: bool = False):
        """(a module whose training forward returns the summed loss, the step's loss function) where the task
        has a cheaper way than logits (training.fusedLoss); None: logits and summed_loss. `compiled`: the run
        compiles (training.compile), so the loss may use torch.compile too."""

    def packed_labels(self, ids: np.ndarray, sample_labels: np.ndarray | None, cu: np.ndarray, samples: int,
                      fillers: int, used: int, trained: np.ndarray | None) -> np.ndarray:
        """The labels of a packed row: one per sample (and filler), or one target per position (`trained`: the
        row's trained-token mask, where the data says which tokens the loss counts)."""


@functools.cache
def task_for(name: str) -> Task:
    """The Task of `spec.model.task` (one instance per name)."""
    from .causal_lm import CausalLM
    from .classification import SequenceClassification

    tasks = {t.name: t for t in (SequenceClassification, CausalLM)}
    return tasks[name]()
