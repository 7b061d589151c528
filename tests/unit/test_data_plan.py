"""Unit tests of the pure pieces the loop stands on: batch planning, step schedule, LR, metrics, loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kubetrain.api import DataSpec
from kubetrain_trainer.data import (
    DataError,
    Encoded,
    TrainSchedule,
    collate,
    pack_by_budget,
    plan_epoch,
    plan_eval,
    read_rows,
)
from kubetrain_trainer.tasks import task_for
from kubetrain_trainer.tasks.classification import classification_metrics, label_vocabulary
from kubetrain_trainer.optim import lr_factor

CLASSIFICATION = task_for("sequence-classification")


def skewed_lengths(n: int = 2000, seed: int = 0, cap: int = 128) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(math.log(40), 0.6, n).astype(np.int64), 3, cap)


def encoded(lengths: np.ndarray) -> Encoded:
    return Encoded([list(range(1, int(n) + 1)) for n in lengths], None, [int(n) % 2 for n in lengths])


def test_packing_respects_the_budget_and_fills_batches():
    lengths = skewed_lengths()
    batches = plan_epoch(lengths, max_tokens=1024, max_samples=None, seed=1, epoch=0)
    padded = [len(b) * lengths[b].max() for b in batches]
    assert max(padded) <= 1024
    assert np.mean(padded) > 0.85 * 1024  # greedy packing of length-sorted windows fills the budget
    real = sum(lengths[b].sum() for b in batches)
    assert real / sum(padded) > 0.9  # under 10% padding on a lognormal corpus


def test_max_samples_caps_batches():
    batches = pack_by_budget(range(100), np.full(100, 4), max_tokens=1024, max_samples=7)
    assert max(len(b) for b in batches) == 7


def test_every_sample_once_per_epoch_deterministic_and_reshuffled():
    lengths = skewed_lengths(500)
    plans = [plan_epoch(lengths, 512, None, seed=3, epoch=e) for e in (0, 0, 1)]
    for plan in plans:
        assert sorted(i for b in plan for i in b) == list(range(500))
    assert plans[0] == plans[1]  # same seed and epoch: the same plan on every rank and every restart
    assert plans[0] != plans[2]  # a new order each epoch


def test_eval_plan_sorted_and_complete():
    lengths = skewed_lengths(300)
    batches = plan_eval(lengths, 512, None)
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert all(len(b) * lengths[b].max() <= 512 for b in batches)


def spec(**kw) -> DataSpec:
    return DataSpec(train="x.jsonl", max_length=128, max_tokens_per_batch=kw.pop("budget", 512), **kw)


def test_schedule_splits_each_step_between_ranks_without_overlap():
    enc = encoded(skewed_lengths(400))
    world, accum = 2, 3
    schedules = [TrainSchedule(enc, spec(), CLASSIFICATION, 0, world, accum) for _ in range(world)]
    steps = schedules[0].steps_in_epoch(0)
    seen: list[int] = []
    for s in range(steps):
        parts = [sched.step(0, s * world * accum, rank) for rank, sched in enumerate(schedules)]
        assert all(len(p.micro_batches) == accum for p in parts)
        assert len({p.global_samples for p in parts}) == 1  # every rank agrees on the step's totals
        samples = [i for p in parts for b in p.micro_batches for i in b]
        assert parts[0].global_samples == len(samples)
        assert parts[0].global_tokens == int(enc.lengths[samples].sum())
        seen += samples
    assert len(seen) == len(set(seen))  # no sample twice in an epoch
    dropped = len(schedules[0].plan(0)) - steps * world * accum
    assert 0 <= dropped < world * accum  # only a tail smaller than one step is dropped


def test_data_position_is_world_size_independent():
    """The cursor counts micro-batches, so a restart with another world size continues the same order."""
    enc = encoded(skewed_lengths(400))
    two = TrainSchedule(enc, spec(), CLASSIFICATION, 0, 2, 1)
    four = TrainSchedule(enc, spec(), CLASSIFICATION, 0, 4, 1)
    order_two = [b for s in range(4) for r in range(2) for b in two.step(0, s * 2, r).micro_batches]
    order_four = [b for s in range(2) for r in range(4) for b in four.step(0, s * 4, r).micro_batches]
    assert order_two == order_four


def test_lm_targets_are_next_tokens():
    enc = Encoded([[1, 2, 3], [4, 5]], None, None)
    sched = TrainSchedule(enc, spec(budget=128), task_for("causal-lm"), 0, 1, 1)
    step = sched.step(0, 0, 0)
    assert (step.global_tokens, step.global_targets) == (5, 3)


def test_total_steps_for_fractional_epochs_and_max_steps():
    enc = encoded(skewed_lengths(400))
    sched = TrainSchedule(enc, spec(), CLASSIFICATION, 0, 1, 1)
    per_epoch = [sched.steps_in_epoch(e) for e in range(3)]
    assert sched.total_steps(2, None) == per_epoch[0] + per_epoch[1]
    assert sched.total_steps(2.5, None) == per_epoch[0] + per_epoch[1] + per_epoch[2] // 2
    assert sched.total_steps(2, 7) == 7


def test_lr_schedule():
    assert [lr_factor(s, 4, 20, "linear") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 20, "linear") == 1.0 and lr_factor(20, 4, 20, "linear") == 0.0
    assert lr_factor(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert lr_factor(19, 4, 20, "constant") == 1.0


def test_classification_metrics_binary_and_macro():
    # rows: true class, columns: predicted
    binary = torch.tensor([[5.0, 1.0], [2.0, 2.0]])
    m = classification_metrics(binary)
    assert m["eval_accuracy"] == pytest.approx(0.7)
    assert m["eval_precision"] == pytest.approx(2 / 3) and m["eval_recall"] == pytest.approx(0.5)
    assert m["eval_f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    three = torch.tensor([[2.0, 0, 0], [0, 1, 1], [0, 0, 0]])  # class 2 never occurs nor is predicted
    m = classification_metrics(three)
    assert m["eval_recall"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_scaled_micro_batch_sums_equal_the_full_batch_mean_gradient():
    """The loop's weighting: sum(loss_i) * world / global_targets over uneven micro-batches == mean."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    full = model.weight.grad.clone()
    model.zero_grad()
    for part in (slice(0, 7), slice(7, 10)):  # uneven, like token-budget batches
        loss, _ = CLASSIFICATION.summed_loss(model(x[part]), {}, y[part])
        (loss / 10).backward()
    assert torch.allclose(model.weight.grad, full, atol=1e-6)


def test_collate_pads_right_and_masks():
    enc = Encoded([[5, 6, 7], [8]], [[0, 0, 1], [0]], [1, 0])
    batch = collate(enc, [0, 1], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["labels"].tolist() == [1, 0]


def test_read_rows_jsonl_and_csv(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",1\nbye,0\n')
    (tmp_path / "a.jsonl").write_text('{"text": "hello, world", "label": 1}\n\n{"text": "bye", "label": 0}\n')
    expected = [("hello, world", "1"), ("bye", "0")]
    for name in ("a.csv", "a.jsonl"):
        assert [(r["text"], str(r["label"])) for r in read_rows(str(tmp_path / name))] == expected
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl line 2: not valid JSON"):
        read_rows(str(tmp_path / "bad.jsonl"))


def test_label_vocabulary_ids_and_names():
    assert label_vocabulary([{"y": 1}, {"y": 0}], "y", 2, "f") == {"0": 0, "1": 1}
    assert label_vocabulary([{"y": "pos"}, {"y": "neg"}], "y", 2, "f") == {"neg": 0, "pos": 1}
    with pytest.raises(DataError, match="outside 0..1"):
        label_vocabulary([{"y": 0}, {"y": 2}], "y", 2, "f")
