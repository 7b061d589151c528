"""Causal-LM rows: prompt-completion and chat data train exactly their answers; errors name the row."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from transformers import AutoTokenizer

from kubetrain.api import DataSpec, TrainingJobSpec
from kubetrain_testkit import tiny
from kubetrain_trainer.data import DataError, TrainSchedule, plan_fixed_steps
from kubetrain_trainer.lm_rows import encode_lm, resolve_style
from kubetrain_trainer.tasks import task_for

CHAT = [
    {"messages": [{"role": "system", "content": "You answer briefly."},
                  {"role": "user", "content": "what is two plus two?"},
                  {"role": "assistant", "content": "four."},
                  {"role": "user", "content": "and three plus three?"},
                  {"role": "assistant", "content": "six, I think."}]},
    {"messages": [{"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello there"}]},
]
PAIRS = [{"prompt": "Question: what is two plus two?\nAnswer:", "completion": " four."},
         {"prompt": "Say hello.\n", "completion": "hello there"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [m["content"] for row in CHAT for m in row["messages"]] + [p["prompt"] + p["completion"] for p in PAIRS]
    return AutoTokenizer.from_pretrained(tiny.train_chat_tokenizer(tmp_path_factory.mktemp("tok"), texts * 20))


def data(**fields) -> DataSpec:
    return DataSpec(train="train.jsonl", **fields)


def trained_text(tokenizer, enc, i: int) -> str:
    return tokenizer.decode([t for t, on in zip(enc.input_ids[i], enc.trained[i]) if on])


def test_prompt_completion_trains_the_completion_and_eos_only(tokenizer):
    enc = encode_lm(PAIRS, tokenizer, data(), "train.jsonl")
    for i, row in enumerate(PAIRS):
        assert tokenizer.decode(enc.input_ids[i]) == row["prompt"] + row["completion"] + tokenizer.eos_token
        assert trained_text(tokenizer, enc, i) == row["completion"] + tokenizer.eos_token
    assert task_for("causal-lm").sample_targets(enc).tolist() == [int(m.sum()) for m in enc.trained]


def test_a_chat_round_trips_through_its_template_and_trains_the_assistant_turns_only(tokenizer):
    enc = encode_lm(CHAT, tokenizer, data(), "train.jsonl")
    for i, row in enumerate(CHAT):
        rendered = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert tokenizer.decode(enc.input_ids[i]) == rendered  # the ids are the whole rendering's
        answers = [m["content"] + "<|im_end|>\n" for m in row["messages"] if m["role"] == "assistant"]
        assert trained_text(tokenizer, enc, i) == "".join(answers)  # end-of-turn trained: the model learns to stop
        assert "assistant\n" not in trained_text(tokenizer, enc, i)  # the generation prompt is not


def test_train_on_all_trains_every_token(tokenizer):
    for rows in (CHAT, PAIRS):
        enc = encode_lm(rows, tokenizer, data(trainOn="all"), "train.jsonl")
        assert enc.trained is None and len(enc) == len(rows)


def test_auto_reads_the_style_off_the_first_row():
    assert [resolve_style(rows, data()) for rows in (CHAT, PAIRS, [{"text": "x"}])] == ["chat", "prompt-completion", "text"]
    assert resolve_style(CHAT, data(style="text")) == "text"


def test_a_tokenizer_without_a_chat_template_is_named_and_spec_data_chat_template_supplies_one(tmp_path):
    bare = AutoTokenizer.from_pretrained(tiny.train_chat_tokenizer(tmp_path, ["hello there"] * 20, chat_template=None))
    with pytest.raises(DataError, match=r"^spec.data.style chat: the tokenizer .* has no chat template; set "
                                        r"spec.data.chatTemplate"):
        encode_lm(CHAT, bare, data(), "train.jsonl")
    enc = encode_lm(CHAT, bare, data(chatTemplate=tiny.CHATML), "train.jsonl")
    assert trained_text(bare, enc, 1) == "hello there<|im_end|>\n"


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_the_row(tokenizer):
    last_only = "{% for m in messages %}{% if loop.last %}[final] {% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match=r"^train.jsonl row 1: the chat template does not render this conversation "
                                        r"turn by turn"):
        encode_lm(CHAT, tokenizer, data(chatTemplate=last_only), "train.jsonl")


@pytest.mark.parametrize("messages, where", [
    ("hello", "row 2: messages: expected a non-empty list"),
    ([{"role": "user"}], "row 2: messages[0]: expected"),
    ([{"role": "user", "content": ["an image"]}], "row 2: messages[0]: expected"),
])
def test_malformed_messages_are_named(tokenizer, messages, where):
    with pytest.raises(DataError, match="^" + re.escape(f"train.jsonl {where}")):
        encode_lm([CHAT[0], {"messages": messages}], tokenizer, data(), "train.jsonl")


def test_a_missing_completion_field_is_named(tokenizer):
    with pytest.raises(DataError, match=r"^train.jsonl row 2: missing field 'completion' \(spec.data.completionField\)"):
        encode_lm([PAIRS[0], {"prompt": "x"}], tokenizer, data(style="prompt-completion"), "train.jsonl")


def test_rows_whose_answer_maxlength_cuts_off_are_left_out_with_a_warning(tokenizer, caplog):
    long_prompt = {"prompt": "what is two plus two? " * 10, "completion": " four."}
    with caplog.at_level(logging.WARNING, logger="kubetrain.data"):
        enc = encode_lm([PAIRS[0], long_prompt, PAIRS[1]], tokenizer, data(maxLength=24), "train.jsonl")
    assert len(enc) == 2 and all(m.any() for m in enc.trained)
    assert "1 of 3 rows have no completion token within spec.data.maxLength 24 (the first: row 2); left out" in caplog.text
    with pytest.raises(DataError, match="no row has a completion token within spec.data.maxLength 8"):
        encode_lm([long_prompt], tokenizer, data(maxLength=8), "train.jsonl")


def test_styles_other_than_text_are_for_causal_lm_and_batch_size_fills_every_micro_batch():
    base = {"image": "img:1", "model": {"config": tiny.TINY_BERT, "tokenizer": "tok", "task": "sequence-classification"},
            "data": {"train": "t.jsonl", "style": "chat"}, "checkpoint": {"uri": "s3://b/c"}}
    with pytest.raises(ValueError, match="data.style chat is for model.task causal-lm"):
        TrainingJobSpec.model_validate(base)
    small = {**base, "data": {"train": "t.jsonl"}, "nodes": 2, "training": {"batchSize": 3, "gradientAccumulation": 2}}
    with pytest.raises(ValueError, match="training.batchSize 3 is smaller than nodes x procsPerNode x "
                                         "gradientAccumulation = 4"):
        TrainingJobSpec.model_validate(small)


def test_batch_size_steps_hold_the_same_samples_whatever_the_world_size():
    lengths = np.random.default_rng(0).integers(2, 60, size=103)
    steps = {}
    for micro in (1, 2, 3, 8):
        plan = plan_fixed_steps(lengths, 16, micro, seed=5, epoch=1)
        assert len(plan) == (103 // 16) * micro
        groups = [plan[k : k + micro] for k in range(0, len(plan), micro)]
        assert all(max(map(len, g)) - min(map(len, g)) <= 1 and sum(map(len, g)) == 16 for g in groups)
        steps[micro] = [sorted(i for b in g for i in b) for g in groups]
    assert steps[1] == steps[2] == steps[3] == steps[8]
    assert plan_fixed_steps(lengths, 16, 2, seed=5, epoch=1) == plan_fixed_steps(lengths, 16, 2, seed=5, epoch=1)
    assert plan_fixed_steps(lengths, 16, 2, seed=5, epoch=2) != plan_fixed_steps(lengths, 16, 2, seed=5, epoch=1)


def test_a_batch_size_schedule_counts_its_samples_and_names_too_little_data():
    from kubetrain_trainer.data import Encoded

    enc = Encoded([[1] * n for n in range(2, 42)], None, [0] * 40)
    schedule = TrainSchedule(enc, data(), task_for("sequence-classification"), 0, world_size=2, grad_accum=2, batch_size=12)
    assert schedule.total_steps(1, None) == 3
    assert [schedule.step(0, 0, rank).global_samples for rank in (0, 1)] == [12, 12]
    assert sum(len(b) for rank in (0, 1) for b in schedule.step(0, 0, rank).micro_batches) == 12
    with pytest.raises(DataError, match="40 samples < training.batchSize 64"):
        TrainSchedule(enc, data(), task_for("sequence-classification"), 0, 1, 1, batch_size=64).total_steps(1, None)


def test_a_conversational_prompt_completion_trains_what_the_completion_adds(tokenizer):
    rows = [{"prompt": [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "say hello"}],
             "completion": [{"role": "assistant", "content": "hello there"}]}]
    enc = encode_lm(rows, tokenizer, data(), "train.jsonl")
    assert tokenizer.decode(enc.input_ids[0]) == tokenizer.apply_chat_template(rows[0]["prompt"] + rows[0]["completion"],
                                                                                tokenize=False)
    assert trained_text(tokenizer, enc, 0) == "hello there<|im_end|>\n"
    with pytest.raises(DataError, match=r"^train.jsonl row 1: completion\[0\]: expected"):
        encode_lm([{"prompt": rows[0]["prompt"], "completion": [{"role": "assistant"}]}], tokenizer, data(), "train.jsonl")
