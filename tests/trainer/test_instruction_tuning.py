"""Instruction tuning end to end through `kubetrain run --local`: chat rows rendered with a chat template, the
loss on the assistant turns only, packed over two nodes, resumed exactly after a SIGTERM."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
import torch

from kubetrain_testkit import tiny

pytestmark = pytest.mark.slow
STEPS = 24


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("chat")
    gen = tiny.sentiment_module()
    train, evals = gen.chat_rows(gen.make_split(300, seed=1)), gen.chat_rows(gen.make_split(60, seed=2))
    gen.write_jsonl(train, out / "train.jsonl")
    gen.write_jsonl(evals, out / "eval.jsonl")
    texts = [m["content"] for row in train for m in row["messages"]]
    return {"train": out / "train.jsonl", "eval": out / "eval.jsonl",
            "tokenizer": tiny.train_chat_tokenizer(out / "tokenizer", texts)}


def chat_job(tmp_path: Path, chat: dict, name: str, **overrides) -> Path:
    settings = {"nodes": 2, "data__packing": True, "training__maxSteps": STEPS, "training__deterministic": True,
                "training__batchSize": 16, "training__learningRate": 1e-2, "training__evalEverySteps": 12,
                "checkpoint__everySteps": 8, "checkpoint__keep": 20,
                "training__generationEval": {"samples": 20, "maxNewTokens": 4, "batchSize": 8}}
    doc = tiny.job_doc(name, chat["train"], chat["eval"], chat["tokenizer"], str(tmp_path / "ckpt"), task="causal-lm",
                       **{**settings, **overrides})
    return tiny.write_job(tmp_path / f"{name}.yaml", doc)


def losses(run: tiny.LocalRun) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in run.matches(rf"step (\d+)/{STEPS} .*\| loss (\S+)")}


def test_a_chat_sft_job_trains_the_answers_and_resumes_exactly_after_sigterm(chat, tmp_path):
    straight = tiny.LocalRun(chat_job(tmp_path, chat, "straight"), env={}, work_dir=tmp_path / "w1")
    assert straight.finish() == 0, straight.output
    trained = losses(straight)
    assert len(trained) == STEPS and float(trained[STEPS]) < float(trained[1]) / 2, trained
    final = json.loads((tmp_path / f"ckpt/tests/straight/step-{STEPS:09d}/manifest.json").read_text())
    assert final["meta"]["state"]["samples_seen"] == 16 * STEPS  # every step is training.batchSize samples
    last_eval = final["meta"]["state"]["last_eval"]
    assert math.exp(last_eval["eval_loss"]) == pytest.approx(last_eval["eval_perplexity"], rel=1e-6)
    earlier = json.loads((tmp_path / "ckpt/tests/straight/step-000000016/manifest.json").read_text())["meta"]["state"]
    assert last_eval["eval_loss"] < earlier["last_eval"]["eval_loss"] < math.log(400)  # below a uniform guess
    # the 20 first eval prompts answered greedily at every evaluation (how they score: test_generation_eval.py)
    assert all(0 <= last_eval[k] <= 1 for k in ("eval_exact_match", "eval_rouge_l")), last_eval

    job = chat_job(tmp_path, chat, "preempted")
    first = tiny.LocalRun(job, env={}, work_dir=tmp_path / "w2")
    first.wait_for(rf"step 10/{STEPS}")
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 75, first.output
    stopped = int(first.wait_for(r"emergency checkpoint at step (\d+) saved").group(1))
    second = tiny.LocalRun(job, env={}, work_dir=tmp_path / "w3")
    assert second.finish() == 0, second.output
    assert int(second.wait_for(r"resumed from \S+ at step (\d+)").group(1)) == stopped < STEPS
    assert {s: v for s, v in losses(second).items() if s > stopped} == {s: v for s, v in trained.items() if s > stopped}
    a, b = (torch.load(tmp_path / f"ckpt/tests/{name}/step-{STEPS:09d}/model.pt", weights_only=True)
            for name in ("straight", "preempted"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
