"""Sequence classification: one label per text (or text pair); accuracy, precision, recall and F1."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kubetrain.api import DataSpec, ModelSpec

from ..batching import IGNORE_LABEL
from ..data import DataError, Encoded, require_fields
from ..packing import BERT_STYLE, ROBERTA_STYLE, PackedOutput, PackingError, hf_model


class SequenceClassification:
    name = "sequence-classification"
    peft_task_type = "SEQ_CLS"  # peft also trains the new classifier head (modules_to_save)

    def auto_model(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def config_kwargs(self, spec: ModelSpec) -> dict:
        return {"num_labels": spec.num_labels}

    def label_vocabulary(self, rows: Sequence[dict], data: DataSpec, model: ModelSpec, uri: str) -> dict[str, int]:
        return label_vocabulary(rows, data.label_field, model.num_labels, uri)

    def encode(self, rows: Sequence[dict], tokenizer, data: DataSpec, uri: str, labels: dict[str, int] | None) -> Encoded:
        require_fields(rows, {"textField": data.text_field, "textPairField": data.text_pair_field, "labelField": data.label_field},
                       uri, text=("textField", "textPairField"))
        texts = [str(r[data.text_field]) for r in rows]
        pairs = [str(r[data.text_pair_field]) for r in rows] if data.text_pair_field else None
        out = tokenizer(texts, pairs, truncation=True, max_length=data.max_length)
        assert labels is not None
        try:
            ids = [labels[str(r[data.label_field])] for r in rows]
        except KeyError as err:
            raise DataError(f"{uri}: label {err.args[0]!r} is not among the training data's labels {sorted(labels)[:10]}") from None
        return Encoded(out["input_ids"], out.get("token_type_ids"), ids)

    def sample_targets(self, encoded: Encoded) -> np.ndarray:
        return np.ones(len(encoded), dtype=np.int64)

    def summed_loss(self, logits, batch, labels):
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_LABEL, reduction="sum"), labels.numel()

    def eval_count_size(self, num_labels: int) -> int:
        return num_labels * num_labels

    def eval_counts(self, logits, labels, num_labels: int) -> torch.Tensor:
        """The flattened [true, predicted] confusion matrix of the batch."""
        confusion = torch.zeros((num_labels, num_labels), dtype=torch.float64, device=logits.device)
        preds = logits.argmax(dim=-1)
        confusion.index_put_((labels, preds), torch.ones_like(preds, dtype=torch.float64), accumulate=True)
        return confusion.flatten()

    def eval_metrics(self, eval_loss: float, counts: torch.Tensor, num_labels: int) -> dict[str, float]:
        return {"eval_loss": eval_loss, **classification_metrics(counts.view(num_labels, num_labels).cpu())}

    def check_packable(self, model_type: str) -> None:
        if model_type not in ROBERTA_STYLE | BERT_STYLE:
            raise PackingError(f"spec.data.packing: sequence classification packs {sorted(ROBERTA_STYLE | BERT_STYLE)} "
                               f"models, not {model_type!r}; set packing: false")

    def packed_forward(self, model, input_ids, position_ids, sample_starts, varlen: dict):
        """The encoder on the packed row, the head on each segment's first token (BERT- and RoBERTa-style)."""
        inner = hf_model(model)
        encoder = getattr(inner, inner.base_model_prefix)
        hidden = encoder(input_ids=input_ids, position_ids=position_ids, **varlen).last_hidden_state
        first = hidden[0].index_select(0, sample_starts)[:, None, :]  # [samples and fillers, 1, hidden]
        if inner.config.model_type in ROBERTA_STYLE:
            return PackedOutput(inner.classifier(first))
        return PackedOutput(inner.classifier(inner.dropout(encoder.pooler(first))))

    def loss_in_forward(self, model, compiled: bool = False) -> None:
        return None  # the head's logits are [samples, labels]: nothing to save

    def packed_labels(self, ids, sample_labels, cu, samples: int, fillers: int, used: int, trained=None) -> np.ndarray:
        return np.concatenate([sample_labels, np.full(fillers, IGNORE_LABEL, dtype=np.int64)])


def label_vocabulary(rows: Sequence[dict], field: str, num_labels: int, uri: str) -> dict[str, int]:
    """Map raw labels to class ids: integers are taken as ids, strings are numbered in sorted order."""
    raw = sorted({str(r[field]) for r in rows if field in r})
    if all(v.lstrip("-").isdigit() for v in raw):
        ids = {v: int(v) for v in raw}
    else:
        ids = {v: i for i, v in enumerate(raw)}
    bad = [v for v, i in ids.items() if not 0 <= i < num_labels]
    if bad:
        row = next(n for n, r in enumerate(rows, start=1) if str(r.get(field)) in bad)
        raise DataError(f"{uri} row {row}: label {str(rows[row - 1][field])!r} is outside 0..{num_labels - 1} "
                        f"(spec.model.numLabels={num_labels}); labels outside: {bad[:5]}")
    return ids


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """From a [true, predicted] count matrix: binary metrics of class 1, macro averages otherwise."""
    tp = confusion.diag()
    predicted = confusion.sum(dim=0)
    actual = confusion.sum(dim=1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(actual > 0, tp / actual.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12), torch.zeros_like(tp))
    pick = (lambda v: v[1].item()) if confusion.shape[0] == 2 else (lambda v: v.mean().item())
    return {
        "eval_accuracy": (tp.sum() / confusion.sum().clamp(min=1)).item(),
        "eval_precision": pick(precision),
        "eval_recall": pick(recall),
        "eval_f1": pick(f1),
    }
