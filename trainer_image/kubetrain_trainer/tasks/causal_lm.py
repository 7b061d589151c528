"""Causal language modelling: every next token of a text is a target; loss and perplexity."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kubetrain.api import DataSpec, ModelSpec

from ..batching import IGNORE_LABEL
from ..data import Encoded, require_fields


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
        """End every document with EOS so the model learns to stop; truncate after adding it."""
        require_fields(rows, {"textField": data.text_field, "textPairField": data.text_pair_field}, uri,
                       text=("textField", "textPairField"))
        texts = [str(r[data.text_field]) for r in rows]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids = [(t + eos)[: data.max_length] for t in tokenizer(texts, add_special_tokens=True)["input_ids"]]
        return Encoded(ids, None, None)

    def targets(self, samples: int, tokens: int) -> int:
        return tokens - samples  # every token but a sample's first is predicted

    def summed_loss(self, logits, batch, labels):
        """Packed rows bring `labels` (each position's target already); padded ones are shifted here.

        The count stays a tensor: reading it would force a host sync in the training loop.
        """
        if labels is not None:
            return (F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_LABEL, reduction="sum"),
                    (labels != IGNORE_LABEL).sum())
        targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, IGNORE_LABEL)
        shifted = logits[:, :-1].float()
        loss = F.cross_entropy(shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), ignore_index=IGNORE_LABEL,
                               reduction="sum")
        return loss, (targets != IGNORE_LABEL).sum()

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

    def packed_labels(self, ids, sample_labels, cu, samples: int, fillers: int, used: int) -> np.ndarray:
        """The next token inside the same sample; none after a sample's last token, fillers or the tail."""
        real = int(cu[samples])  # tokens of the real samples
        targets = np.full(len(ids), IGNORE_LABEL, dtype=np.int64)
        targets[: real - 1] = ids[1:real]
        targets[cu[1 : samples + 1] - 1] = IGNORE_LABEL
        return targets[None]
