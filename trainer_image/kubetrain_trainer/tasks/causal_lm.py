"""Causal language modelling: the next token is the target (of every token, or of completions and assistant
turns only); loss and perplexity over the trained tokens."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kubetrain.api import DataSpec, ModelSpec

from ..data import IGNORE_LABEL, Encoded, next_token_targets
from ..lm_loss import FusedLossLM, chunk_tokens, fusable, fused_loss, position_targets
from ..lm_rows import encode_lm

log = logging.getLogger("kubetrain.model")


class CausalLM:
    name = "causal-lm"
    peft_task_type = "CAUSAL_LM"

    def auto_model(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def config_kwargs(self, spec: ModelSpec) -> dict:
        return {}

    def label_vocabulary(self, rows, data, model, uri) -> None:
        return None

    def encode(self, rows: Sequence[dict], tokenizer, data: DataSpec, uri: str, labels: None) -> Encoded:
        """Text, prompt-completion or chat rows (lm_rows); every text ends with EOS so the model learns to stop."""
        return encode_lm(rows, tokenizer, data, uri)

    def sample_targets(self, encoded: Encoded) -> np.ndarray:
        if encoded.trained is None:
            return encoded.lengths - 1  # every token but a sample's first is predicted
        return encoded.trained.row_sums()

    def summed_loss(self, logits, batch, labels):
        """Each position's target (lm_loss.position_targets): the batch's `labels` (packed rows, or rows that train
        some tokens only), else the next real token. The count stays a tensor: reading it would force a host sync."""
        targets = position_targets(batch, labels)
        return (F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_LABEL, reduction="sum"),
                (targets != IGNORE_LABEL).sum())

    def eval_count_size(self, num_labels: int) -> int:
        return 0

    def eval_counts(self, logits, labels, num_labels: int) -> torch.Tensor:
        return torch.zeros(0, dtype=torch.float64, device=logits.device)

    def eval_metrics(self, eval_loss: float, counts: torch.Tensor, num_labels: int) -> dict[str, float]:
        return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 700.0))}

    def check_packable(self, model_type: str) -> None:
        return None  # any model on transformers' attention interface (checked by packing)

    def packed_forward(self, model, input_ids, position_ids, sample_starts, varlen: dict):
        return model(input_ids=input_ids, position_ids=position_ids, **varlen)

    def loss_in_forward(self, model, compiled: bool = False):
        """The LM head and cross-entropy fused in chunks (lm_loss): the logits are never whole."""
        why = fusable(model)
        if why:
            log.info("training.fusedLoss: full logits (%s)", why)
            return None
        fused = FusedLossLM(model, compiled=compiled)
        chunk = chunk_tokens(fused.head.weight.shape[0])
        log.info("training.fusedLoss: the LM head and the cross-entropy fused in chunks of %d tokens%s", chunk,
                 ", each chunk's softmax compiled" if compiled else "")
        return fused, fused_loss

    def packed_labels(self, ids, sample_labels, cu, samples: int, fillers: int, used: int, trained=None) -> np.ndarray:
        """The next token inside the same sample; none after a sample's last token, fillers or the tail (and,
        where the data says which tokens are trained, none but those)."""
        if trained is not None:
            return next_token_targets(ids, trained)[None]
        real = int(cu[samples])  # tokens of the real samples
        targets = np.full(len(ids), IGNORE_LABEL, dtype=np.int64)
        targets[: real - 1] = ids[1:real]
        targets[cu[1 : samples + 1] - 1] = IGNORE_LABEL
        return targets[None]
