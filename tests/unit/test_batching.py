"""The fast batcher builds exactly data.collate's tensors, and its filler rows change nothing."""

from __future__ import annotations

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification

from kubetrain_trainer.batching import BatchShapes, DeviceBatcher
from kubetrain_trainer.data import Encoded, Ragged, collate
from kubetrain_trainer.tasks import task_for

CPU = torch.device("cpu")


def encoded(with_types: bool = True) -> Encoded:
    g = torch.Generator().manual_seed(0)
    lengths = [3, 17, 9, 1, 30, 12]
    ids = [torch.randint(5, 90, (n,), generator=g).tolist() for n in lengths]
    types = [[0] * (n // 2) + [1] * (n - n // 2) for n in lengths] if with_types else None
    return Encoded(ids, types, [i % 2 for i in range(len(lengths))])


def test_batches_equal_collate():
    for with_types in (True, False):
        enc = encoded(with_types)
        batcher = DeviceBatcher(enc, pad_id=0, device=CPU)
        for indices in ([0, 1, 2], [4], [3, 5, 1, 0]):
            want, got = collate(enc, indices, pad_id=0), batcher(indices)
            assert got.keys() == want.keys()
            for key in want:
                assert torch.equal(got[key], want[key]), key


def test_shaped_batches_round_width_and_fill_rows():
    enc = encoded()
    batch = DeviceBatcher(enc, pad_id=0, device=CPU, shapes=BatchShapes(width_multiple=8, rows=4, rows_multiple=8))([1, 2])
    assert batch["input_ids"].shape == (4, 24) and batch["attention_mask"].shape == (4, 24)
    assert batch["attention_mask"].sum(dim=1).tolist() == [17, 9, 1, 1]
    assert batch["labels"].tolist() == [1, 0, -100, -100]
    bigger = DeviceBatcher(enc, pad_id=0, device=CPU, shapes=BatchShapes(width_multiple=8, rows=4, rows_multiple=8))([0, 1, 2, 3, 4])
    assert bigger["input_ids"].shape == (8, 32)


def test_filler_rows_add_nothing_to_loss_or_gradients():
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                                     attention_probs_dropout_prob=0.0))
    enc = encoded()

    def loss_and_grads(shapes):
        model.zero_grad(set_to_none=True)
        batch = DeviceBatcher(enc, pad_id=0, device=CPU, shapes=shapes)([1, 2, 4])
        labels = batch.pop("labels")
        loss, _ = task_for("sequence-classification").summed_loss(model(**batch).logits, batch, labels)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain_loss, plain_grads = loss_and_grads(None)
    filled_loss, filled_grads = loss_and_grads(BatchShapes(width_multiple=16, rows=8, rows_multiple=8))
    torch.testing.assert_close(filled_loss, plain_loss)
    for a, b in zip(filled_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in plain_grads)


def test_ragged_rows_pad_gather_and_sum_as_lists_do():
    rows = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    ragged = Ragged.from_rows(rows, np.int32)
    assert [r.tolist() for r in ragged] == rows and ragged.lengths.tolist() == [3, 1, 5, 2]
    assert ragged.padded([2, 0], 4, -1).tolist() == [[9, 10, 11, 12], [5, 6, 7, -1]]  # cut to width, and padded
    assert ragged.gather(np.array([3, 0, 1])).tolist() == [14, 15, 5, 6, 7, 8]
    assert Ragged.from_rows([[1, 0], [0], [1, 1, 1]], np.bool_).row_sums().tolist() == [1, 0, 3]
    assert [r.tolist() for r in ragged[1:3]] == rows[1:3]
