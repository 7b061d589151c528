"""Packed micro-batches (`spec.data.packing`): samples laid end to end in one row, no padding at all.

A padded batch feeds `samples x longest` tokens and attends over the pads; a packed one feeds the
real tokens once, and attention stays inside each sample through variable-length flash attention
(`cu_seqlens`, the cumulative sample lengths). On a GPU that removes the padding from every matmul
and runs attention over exactly the real tokens.

The pieces:
- `PackedBatcher`: sample indices -> one row of ids, per-sample position ids, `cu_seqlens`, labels.
  A compiled model wants few shapes, so the row is rounded up with a tail segment of pad tokens, and
  graphs' fixed sample count is met with one-token filler samples; neither adds to the loss.
- `packed_attention`: registered with transformers' attention interface; flash varlen on CUDA
  (bf16/fp16), a block-diagonal mask elsewhere (CPU tests). Without `cu_seqlens` (evaluation's padded
  batches) it is plain SDPA. Packed forwards hand transformers a placeholder 4D mask, so it builds none.
- `PackedModel`: runs the encoder on the packed row and the classification head on each sample's
  first token (BERT- and RoBERTa-style heads), or the causal LM on the row (labels are next tokens
  inside each sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kubetrain.contracts import Reason

from .batching import to_device
from .data import Encoded
from .failures import PermanentError

ATTENTION = "kubetrain_packed"
# classification heads that read the first token: the encoder's attribute, and how the head is applied
ROBERTA_STYLE = {"roberta", "xlm-roberta", "camembert"}
BERT_STYLE = {"bert"}


class PackingError(PermanentError, ValueError):
    """The model cannot be trained on packed batches."""

    reason, kind = Reason.INVALID_SPEC, "invalid TrainingJob"


# --- attention ----------------------------------------------------------------------------------


def _segment_mask(cu_seqlens: torch.Tensor, total: int, causal: bool) -> torch.Tensor:
    positions = torch.arange(total, device=cu_seqlens.device)
    segment = torch.searchsorted(cu_seqlens[1:].to(torch.int64), positions, right=True)
    mask = segment[:, None] == segment[None, :]
    if causal:
        mask = mask & (positions[:, None] >= positions[None, :])
    return mask


def packed_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                     cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None, **kwargs):
    """Attention over a packed row ([1, heads, T, dim]) within each `cu_seq_lens_q` segment; else SDPA.

    Grouped-query models pass fewer key/value heads than query heads: flash takes them as they are, the
    dense path through SDPA's enable_gqa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    causal = bool(getattr(module, "is_causal", False))
    kind = query.device.type
    compute = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else value.dtype
    if {query.dtype, key.dtype, value.dtype} != {compute}:
        # Under bf16 autocast transformers may hand over fp32 q/k (Llama's rotary) and, measured with 5.17 on an
        # H200, fp32 v too: attention then ran in fp32 through the dense mask, at half the speed. SDPA would run
        # in autocast's dtype, so flash varlen (and the CPU's dense path) run in it too.
        query, key, value = query.to(compute), key.to(compute), value.to(compute)
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, dim]
        out = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, dropout, causal, False, scale=scaling)[0]
        return out.unsqueeze(0), None  # [1, T, heads, dim], as transformers' attention functions return
    mask = _segment_mask(cu_seq_lens_q, query.shape[2], causal)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         enable_gqa=query.shape[1] != key.shape[1])  # grouped-query heads
    return out.transpose(1, 2).contiguous(), None


def mask_placeholder(input_ids: torch.Tensor) -> torch.Tensor:
    """A 4D attention mask of one element, broadcast over the row: transformers returns a 4D mask as it is, so it
    neither looks at the packed position ids for sample starts (`(...).all()` in a Python `if`, one host sync per
    step) nor builds a [T, T] mask (1 GiB at 32k tokens) that packed attention would ignore for cu_seqlens."""
    total = input_ids.shape[-1]
    return torch.ones((), dtype=torch.bool, device=input_ids.device).expand(1, 1, total, total)


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, packed_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # evaluation's padded batches


# --- the model ----------------------------------------------------------------------------------


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (LoRA layers injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_packable(model: torch.nn.Module, task) -> None:
    inner = hf_model(model)
    task.check_packable(inner.config.model_type)
    if not getattr(type(inner), "_supports_attention_backend", False):
        raise PackingError(f"spec.data.packing: {inner.config.model_type!r} does not use transformers' attention "
                           "interface; set packing: false")


def position_offset(model: torch.nn.Module) -> int:
    """RoBERTa-style models number positions from padding_idx + 1; the others from 0."""
    inner = hf_model(model)
    return inner.config.pad_token_id + 1 if inner.config.model_type in ROBERTA_STYLE else 0


class PackedModel(torch.nn.Module):
    """Forward over a packed row through the task (`Task.packed_forward`); returns an object with `.logits`.

    Classification: logits [samples + filler, labels] from each segment's first token. Causal LM:
    logits [1, T, vocab]. The parameters are the wrapped model's (checkpoints and evaluation use it).
    """

    def __init__(self, model: torch.nn.Module, task, max_segment: int):
        super().__init__()
        check_packable(model, task)
        _register_attention()
        hf_model(model).set_attn_implementation(ATTENTION)
        self.model, self.task, self.max_segment = model, task, max_segment

    def forward(self, input_ids, position_ids, cu_seqlens, sample_starts, token_type_ids=None, targets=None):
        varlen = {"cu_seq_lens_q": cu_seqlens, "max_length_q": self.max_segment,
                  "attention_mask": mask_placeholder(input_ids)}
        if token_type_ids is not None:
            varlen["token_type_ids"] = token_type_ids
        if targets is not None:  # the loss in the forward (lm_loss.FusedLossLM)
            varlen["targets"] = targets
        return self.task.packed_forward(self.model, input_ids, position_ids, sample_starts, varlen)


@dataclass
class PackedOutput:
    logits: torch.Tensor


# --- batches ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedShapes:
    """Few row shapes for a compiled model: the row is rounded up to a power-of-two step near 1/16 of its
    length (so about 3 % is tail), and filled with one-token filler samples to `samples` (more samples:
    to a multiple of `samples_multiple`). The tail is split into segments of at most `max_segment` tokens,
    their count fixed by the row length (trailing ones may be empty), so flash attention's longest
    segment stays the data's cap."""

    samples: int
    max_segment: int
    fraction: int = 16
    min_step: int = 128
    samples_multiple: int = 8

    def sample_count(self, samples: int) -> int:
        return self.samples if samples <= self.samples else -(-samples // self.samples_multiple) * self.samples_multiple

    def row_length(self, tokens: int) -> int:
        need = tokens + 1  # at least one tail token
        step = max(self.min_step, 1 << max(0, (need // self.fraction).bit_length() - 1))
        return -(-need // step) * step

    def tail_segments(self, row_length: int) -> int:
        """How many tail segments a row of this length has; bounds the tail (<= the step) for any filling."""
        return -(-max(self.min_step, row_length // self.fraction) // self.max_segment)


class PackedBatcher:
    """Turns a micro-batch's sample indices into one packed row on `device` (see the module docstring)."""

    def __init__(self, encoded: Encoded, pad_id: int, device: torch.device, task, position_offset: int,
                 shapes: PackedShapes | None = None):
        self.device, self.pad_id, self.task, self.offset = device, pad_id, task, position_offset
        self.shapes = shapes
        self.lengths = encoded.lengths
        self.ids = encoded.input_ids
        self.types = encoded.token_type_ids
        self.labels = np.asarray(encoded.labels, dtype=np.int64) if encoded.labels is not None else None
        self.trained = encoded.trained

    def shape(self, indices: Sequence[int]) -> tuple[int, int]:
        """(row length, samples with fillers) of a batch: what its tensors' shapes follow from."""
        samples = len(indices) + self._fillers(len(indices))
        used = int(self.lengths[np.asarray(indices, dtype=np.int64)].sum()) + samples - len(indices)
        return (self.shapes.row_length(used) if self.shapes else used), samples

    def _fillers(self, samples: int) -> int:
        return self.shapes.sample_count(samples) - samples if self.shapes else 0

    def __call__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        fillers = self._fillers(len(idx))
        lengths = np.concatenate([self.lengths[idx], np.ones(fillers, dtype=np.int64)])
        used = int(lengths.sum())
        total = self.shapes.row_length(used) if self.shapes else used
        tail = []
        if self.shapes:  # pads after the samples, as segments of at most max_segment tokens (trailing ones empty)
            pieces = self.shapes.tail_segments(total)
            tail = np.clip(total - used - self.shapes.max_segment * np.arange(pieces), 0, self.shapes.max_segment)
        cu = np.concatenate([[0], np.cumsum(np.concatenate([lengths, tail]))]).astype(np.int32)
        real = int(self.lengths[idx].sum())
        ids = np.full(total, self.pad_id, dtype=np.int64)
        ids[:real] = self.ids.gather(idx)
        positions = np.full(total, self.offset, dtype=np.int64)  # the tail's positions do not matter
        positions[:used] += np.arange(used) - np.repeat(cu[: len(lengths)], lengths)
        host = {"input_ids": ids[None], "position_ids": positions[None], "cu_seqlens": cu,
                "sample_starts": cu[: len(lengths)].astype(np.int64)}
        if self.types is not None:
            types = np.zeros(total, dtype=np.int64)
            types[:real] = self.types.gather(idx)
            host["token_type_ids"] = types[None]
        sample_labels = self.labels[idx] if self.labels is not None else None
        trained = None
        if self.trained is not None:  # fillers and the tail train nothing
            trained = np.zeros(total, dtype=bool)
            trained[:real] = self.trained.gather(idx)
        host["labels"] = self.task.packed_labels(ids, sample_labels, cu, len(idx), fillers, used, trained)
        return {k: to_device(v, self.device) for k, v in host.items()}
