"""The seams of the trainer: every task implements the whole Task protocol, and a checkpoint's content is a
registry whose components round-trip through their files."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from kubetrain.api import ModelSpec
from kubetrain_trainer.checkpoint_state import CheckpointContent, Group, TrainState
from kubetrain_trainer.data import Encoded
from kubetrain_trainer.tasks import Task, task_for

TASK_NAMES = list(ModelSpec.model_fields["task"].annotation.__args__)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_every_task_of_the_schema_implements_the_protocol(name):
    task = task_for(name)
    assert task.name == name and task_for(name) is task
    wanted = {n for n, v in vars(Task).items() if inspect.isfunction(v) and not n.startswith("_")}
    missing = {n for n in wanted if not callable(getattr(task, n, None))}
    assert wanted and not missing, f"{name} lacks {sorted(missing)}"


def test_classification_counts_a_confusion_matrix_and_the_lm_nothing():
    cls, lm = task_for("sequence-classification"), task_for("causal-lm")
    logits, labels = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 1, 1])
    counts = cls.eval_counts(logits, labels, 2)
    assert counts.tolist() == [1.0, 0.0, 1.0, 1.0] and counts.numel() == cls.eval_count_size(2)
    assert cls.eval_metrics(0.5, counts, 2)["eval_accuracy"] == pytest.approx(2 / 3)
    assert lm.eval_count_size(2) == 0 and set(lm.eval_metrics(0.0, torch.zeros(0), 2)) == {"eval_loss", "eval_perplexity"}
    enc = Encoded([[1, 2, 3], [4, 5, 6, 7]], None, [0, 1])
    masked = Encoded(enc.input_ids, None, None, [np.array([0, 0, 1], bool), np.array([0, 1, 1, 0], bool)])
    assert (cls.sample_targets(enc).tolist(), lm.sample_targets(enc).tolist(), lm.sample_targets(masked).tolist()) == (
        [1, 1], [2, 3], [1, 2])


def test_checkpoint_content_round_trips_each_component_through_its_own_file(tmp_path):
    class Box:
        def __init__(self, value):
            self.value = value

        def state_dict(self):
            return {"value": self.value}

        def load_state_dict(self, state):
            self.value = state["value"]

    saved_state, saved = TrainState(step=7, epoch=1, last_eval={"eval_loss": 0.5}), Box(torch.arange(3))
    content = CheckpointContent()
    content.register("state.json", saved_state)
    content.register("training.pt", Group(box=saved))
    with pytest.raises(ValueError, match="registered twice"):
        content.register("state.json", saved_state)
    paths = {}
    for file, state in content.state_dicts().items():
        paths[file] = tmp_path / file
        content.write(file, state, paths[file])
    assert paths["state.json"].read_text().startswith("{")  # JSON, readable in the bucket

    restored_state, restored = TrainState(), Box(None)
    target = CheckpointContent()
    target.register("state.json", restored_state)
    target.register("training.pt", Group(box=restored))
    target.load(paths)
    assert restored_state == saved_state and torch.equal(restored.value, saved.value)
