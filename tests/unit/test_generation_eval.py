"""training.generationEval: the prompts are the rows' text before their last answer, batched left-padded
generation answers as one-by-one generation does, and the scores are the rouge-score package's."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from kubetrain.api import DataSpec, GenerationEvalSpec
from kubetrain_testkit import tiny
from kubetrain_trainer.distributed import Runtime
from kubetrain_trainer.generation_eval import Prompts, generation_metrics, prompts_for
from kubetrain_trainer.lm_rows import encode_lm

CPU = torch.device("cpu")
ROWS = [{"messages": [{"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello there"}]},
        {"messages": [{"role": "user", "content": "what is two plus two?"}, {"role": "assistant", "content": "four"},
                      {"role": "user", "content": "and three plus three?"}, {"role": "assistant", "content": "six"}]},
        {"messages": [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "blue, I think"}]}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [m["content"] for r in ROWS for m in r["messages"]] * 30
    return AutoTokenizer.from_pretrained(tiny.train_chat_tokenizer(tmp_path_factory.mktemp("tok"), texts))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256, initializer_range=0.5)
    return GPT2LMHeadModel(config).eval()


def one_by_one(model, tokenizer, prompts: Prompts, max_new: int) -> list[str]:
    out = []
    for p in prompts.prompts:
        ids = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), do_sample=False,
                             max_new_tokens=max_new, eos_token_id=prompts.stop_ids, pad_token_id=tokenizer.pad_token_id)
        out.append(tokenizer.decode(ids[0, len(p):].tolist(), skip_special_tokens=True))
    return out


def test_each_prompt_ends_where_its_last_answer_starts_and_the_end_of_turn_stops_generation(tokenizer):
    enc = encode_lm(ROWS, tokenizer, DataSpec(train="t.jsonl"), "t.jsonl")
    prompts = prompts_for(enc, GenerationEvalSpec(samples=2, batchSize=1), tokenizer, Runtime(0, 0, 1, CPU))
    assert prompts.references == ["hello there", "six"] and prompts.batches == 2
    assert tokenizer.decode(prompts.prompts[1]).endswith("and three plus three?<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in prompts.stop_ids
    second_rank = prompts_for(enc, GenerationEvalSpec(samples=3, batchSize=1), tokenizer, Runtime(1, 1, 2, CPU))
    assert second_rank.references == ["six"] and second_rank.batches == 2  # ranks make as many calls


def test_batched_answers_equal_one_by_one_and_score_as_rouge_score_does(model, tokenizer):
    from rouge_score import rouge_scorer

    enc = encode_lm(ROWS, tokenizer, DataSpec(train="t.jsonl"), "t.jsonl")
    spec = GenerationEvalSpec(samples=3, maxNewTokens=6, batchSize=3)
    prompts = prompts_for(enc, spec, tokenizer, Runtime(0, 0, 1, CPU))
    answers = one_by_one(model, tokenizer, prompts, 6)
    assert any(a.strip() for a in answers)
    own = Prompts(prompts.prompts, answers, prompts.stop_ids, prompts.batches)  # its own answers as references
    got = generation_metrics(model, own, spec, tokenizer, device=CPU, autocast=contextlib.nullcontext, synced=False)
    assert got == {"eval_exact_match": 1.0, "eval_rouge_l": pytest.approx(sum(1.0 if a.split() else 0.0 for a in answers) / 3)}
    scored = generation_metrics(model, prompts, spec, tokenizer, device=CPU, autocast=contextlib.nullcontext, synced=False)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    want = sum(scorer.score(r, a)["rougeL"].fmeasure for r, a in zip(prompts.references, answers)) / 3
    assert scored["eval_rouge_l"] == pytest.approx(want)
    assert scored["eval_exact_match"] == sum(" ".join(r.split()) == " ".join(a.split())
                                             for r, a in zip(prompts.references, answers)) / 3
