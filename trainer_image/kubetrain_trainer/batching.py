"""Micro-batches as device tensors with little host time: one padded array per split, sliced per batch.

A batch is padded from the split's flat token arrays (`data.Ragged`) in a few numpy calls, travels
through pinned memory with a non-blocking copy, and its attention mask is built on the device from
the lengths; nothing is padded ahead of time (a split padded whole would cost samples x longest x 8
bytes on every rank). The tensors equal `data.collate`'s.

A compiled model (see `compile.py`) wants few distinct shapes: `BatchShapes` rounds the padded
width up to a multiple and fills the batch to a fixed number of rows with dummy rows (one attended
pad token, label -100), which add exactly nothing to the summed loss or the gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .data import IGNORE_LABEL, Encoded, Ragged, next_token_targets

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
        self.encoded, self.lengths = encoded, encoded.lengths
        self.cap = self.shapes.width(int(self.lengths.max()))
        self.labels = np.asarray(encoded.labels, dtype=np.int64) if encoded.labels is not None else None

    def __call__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[idx]
        width = min(self.shapes.width(int(lengths.max())), self.cap)
        rows = self.shapes.row_count(len(idx))
        enc = self.encoded
        host = {"input_ids": self._rows(enc.input_ids, idx, width, rows, self.pad_id),
                "lengths": np.concatenate([lengths, np.ones(rows - len(idx), dtype=np.int64)])}
        if enc.token_type_ids is not None:
            host["token_type_ids"] = self._rows(enc.token_type_ids, idx, width, rows, 0)
        if self.labels is not None:
            host["labels"] = np.concatenate([self.labels[idx], np.full(rows - len(idx), IGNORE_LABEL, dtype=np.int64)])
        if enc.trained is not None:  # per-position next-token targets; dummy rows train nothing
            host["labels"] = next_token_targets(host["input_ids"], self._rows(enc.trained, idx, width, rows, False))
        batch = {k: to_device(v, self.device) for k, v in host.items()}
        lengths_d = batch.pop("lengths")
        batch["attention_mask"] = (torch.arange(width, device=self.device) < lengths_d[:, None]).long()
        return batch

    @staticmethod
    def _rows(ragged: Ragged, idx: np.ndarray, width: int, rows: int, fill) -> np.ndarray:
        """The samples padded to `width`; then dummy rows (all pad; their single attended token keeps softmax finite)."""
        out = ragged.padded(idx, width, fill)
        if rows > len(idx):
            out = np.concatenate([out, np.full((rows - len(idx), width), fill, dtype=out.dtype)])
        return out if out.dtype == np.bool_ else out.astype(np.int64)


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`: through pinned memory and a non-blocking copy on CUDA."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
