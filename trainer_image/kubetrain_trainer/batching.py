"""Micro-batches as device tensors with little host time: one padded array per split, sliced per batch.

`data.collate` builds every batch row by row in Python. On a GPU at small batches that host time
becomes the step time, so here a split is padded once into a numpy array, a batch is one slice,
it travels through pinned memory with a non-blocking copy, and the attention mask is built on the
device from the lengths. The tensors equal `data.collate`'s.

A compiled model (see `compile.py`) wants few distinct shapes: `BatchShapes` rounds the padded
width up to a multiple and fills the batch to a fixed number of rows with dummy rows (one attended
pad token, label -100), which add exactly nothing to the summed loss or the gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data import IGNORE_LABEL, Encoded, next_token_targets, padded_trained

__all__ = ["IGNORE_LABEL", "BatchShapes", "DeviceBatcher", "to_device"]


@dataclass(frozen=True)
class BatchShapes:
    """How a compiled model's batches are shaped: width a multiple of `width_multiple`, `rows` rows
    (at least; a bigger batch is rounded up to a multiple of `rows_multiple` instead)."""

    width_multiple: int = 1
    rows: int = 1
    rows_multiple: int = 1

    def width(self, longest: int) -> int:
        return -(-longest // self.width_multiple) * self.width_multiple

    def row_count(self, samples: int) -> int:
        return self.rows if samples <= self.rows else -(-samples // self.rows_multiple) * self.rows_multiple


class DeviceBatcher:
    """Turns a micro-batch's sample indices into the model's input tensors on `device`."""

    def __init__(self, encoded: Encoded, pad_id: int, device: torch.device, shapes: BatchShapes | None = None):
        self.device, self.shapes, self.pad_id = device, shapes or BatchShapes(), pad_id
        self.lengths = encoded.lengths
        width = self.shapes.width(int(self.lengths.max()))
        self.ids = self._padded(encoded.input_ids, width, pad_id)
        self.types = self._padded(encoded.token_type_ids, width, 0) if encoded.token_type_ids else None
        self.labels = np.asarray(encoded.labels, dtype=np.int64) if encoded.labels is not None else None
        self.trained = padded_trained(encoded, range(len(encoded)), width) if encoded.trained is not None else None

    def _padded(self, rows: Sequence[Sequence[int]], width: int, fill: int) -> np.ndarray:
        out = np.full((len(rows), width), fill, dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    def __call__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[idx]
        width = min(self.shapes.width(int(lengths.max())), self.ids.shape[1])
        rows = self.shapes.row_count(len(idx))
        host = {"input_ids": self._rows(self.ids, idx, width, rows, self.pad_id),
                "lengths": np.concatenate([lengths, np.ones(rows - len(idx), dtype=np.int64)])}
        if self.types is not None:
            host["token_type_ids"] = self._rows(self.types, idx, width, rows, 0)
        if self.labels is not None:
            host["labels"] = np.concatenate([self.labels[idx], np.full(rows - len(idx), IGNORE_LABEL, dtype=np.int64)])
        if self.trained is not None:  # per-position next-token targets; dummy rows train nothing
            trained = self.trained[idx, :width]
            if rows > len(idx):
                trained = np.concatenate([trained, np.zeros((rows - len(idx), width), dtype=bool)])
            host["labels"] = next_token_targets(host["input_ids"], trained)
        batch = {k: to_device(v, self.device) for k, v in host.items()}
        lengths_d = batch.pop("lengths")
        batch["attention_mask"] = (torch.arange(width, device=self.device) < lengths_d[:, None]).long()
        return batch

    @staticmethod
    def _rows(array: np.ndarray, idx: np.ndarray, width: int, rows: int, fill: int) -> np.ndarray:
        out = array[idx, :width]
        if rows > len(idx):  # dummy rows: all pad; their single attended token keeps softmax finite
            out = np.concatenate([out, np.full((rows - len(idx), width), fill, dtype=np.int64)])
        return out



def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`: through pinned memory and a non-blocking copy on CUDA."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
