"""Large-model settings, in one process: a LoRA base in the training precision, activation checkpointing,
the refusals of quantization and fsdp combinations that cannot work, and the resumed step's accumulation."""

from __future__ import annotations

import pytest
import torch

from kubetrain.api import LoraSpec, ModelSpec, SpecError, parse_training_job
from kubetrain_trainer.failures import ModelError, describe
from kubetrain_trainer.model import build_model, enable_activation_checkpointing
from kubetrain_trainer.resume import accumulation_for
from kubetrain_trainer.tasks import task_for

LLAMA_GQA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "vocab_size": 100}
LM = task_for("causal-lm")


class Tokenizer:
    pad_token_id = 0

    def __len__(self):
        return 100


def llama(tmp_path, **model) -> torch.nn.Module:
    spec = ModelSpec(config=LLAMA_GQA, tokenizer="t", task="causal-lm", **model)
    return build_model(spec, LM, Tokenizer(), tmp_path, precision=model.pop("precision", "bf16"))


@pytest.mark.parametrize("precision, base", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)])
def test_a_lora_base_is_stored_in_the_training_precision_and_what_trains_in_fp32(precision, base, tmp_path):
    spec = ModelSpec(config=LLAMA_GQA, tokenizer="t", task="causal-lm", lora=LoraSpec(r=4))
    model = build_model(spec, LM, Tokenizer(), tmp_path, precision=precision)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {base} and trained == {torch.float32}
    full = build_model(ModelSpec(config=LLAMA_GQA, tokenizer="t", task="causal-lm"), LM, Tokenizer(), tmp_path,
                       precision=precision)
    assert {p.dtype for p in full.parameters()} == {torch.float32}  # fully trained: AMP's fp32 master weights


def test_a_lora_classifier_head_copied_from_a_bf16_base_trains_in_fp32(tmp_path):
    spec = ModelSpec(config={"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                             "intermediate_size": 64, "vocab_size": 100}, tokenizer="t", task="sequence-classification",
                     lora=LoraSpec(r=4, target_modules=["query", "value"]))
    model = build_model(spec, task_for("sequence-classification"), Tokenizer(), tmp_path, precision="bf16")
    trained = {n: p.dtype for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trained) and set(trained.values()) == {torch.float32}


def test_activation_checkpointing_recomputes_every_block_and_changes_no_gradient(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelSpec(config=LLAMA_GQA, tokenizer="t", task="causal-lm"), LM, Tokenizer(), tmp_path)
    ids = torch.randint(1, 100, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def grads_and_block_calls():
        calls = []
        # the first module inside a block (the block's own hooks stay outside the checkpoint, e.g. FSDP2's; and
        # the recompute stops early once it has every saved tensor, so later modules may not run to their end)
        hooks = [layer.self_attn.register_forward_hook(lambda *_: calls.append(1)) for layer in model.model.layers]
        model.zero_grad(set_to_none=True)
        loss, _ = LM.summed_loss(model(**batch).logits, batch, None)
        loss.backward()
        for h in hooks:
            h.remove()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    model.train()
    plain, plain_calls = grads_and_block_calls()
    assert enable_activation_checkpointing(model) == 3
    checkpointed, calls = grads_and_block_calls()
    assert (plain_calls, calls) == (3, 6)  # each block ran again in the backward
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_quantization_refuses_what_cannot_work_in_one_line(tmp_path):
    spec = ModelSpec(config=LLAMA_GQA, tokenizer="t", task="causal-lm", lora=LoraSpec(), quantization="4bit")
    with pytest.raises(ModelError, match=r"quantization: 4bit needs pretrained weights \(spec.model.name\)"):
        build_model(spec, LM, Tokenizer(), tmp_path)
    pretrained = tmp_path / "tiny-llama"
    build_model(ModelSpec(config=LLAMA_GQA, tokenizer="t", task="causal-lm"), LM, Tokenizer(), tmp_path).save_pretrained(pretrained)
    spec = ModelSpec(name=str(pretrained), task="causal-lm", lora=LoraSpec(), quantization="8bit")
    with pytest.raises(ModelError) as err:
        build_model(spec, LM, Tokenizer(), tmp_path, device="cpu")
    failure = describe(err.value)
    assert failure.permanent and failure.message == ("model error: spec.model.quantization: 8bit needs a CUDA GPU "
                                                     "(bitsandbytes); this worker runs on cpu")


def job(**spec) -> dict:
    base = {"image": "i", "model": {"config": {"model_type": "llama"}, "tokenizer": "t", "task": "causal-lm"},
            "data": {"train": "s3://b/t.jsonl"}, "checkpoint": {"uri": "s3://b/c"}}
    for section, values in spec.items():
        base[section] = {**base.get(section, {}), **values}
    return {"apiVersion": "kubetrain.io/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "j"}, "spec": base}


@pytest.mark.parametrize("spec, message", [
    ({"model": {"quantization": "4bit"}}, "spec.model: quantization 4bit needs `lora`"),
    ({"training": {"strategy": "fsdp", "precision": "fp16"}}, "training.precision fp16 with strategy fsdp: use bf16"),
    ({"training": {"strategy": "fsdp"}, "model": {"quantization": "8bit", "lora": {}}},
     "model.quantization 8bit with training.strategy fsdp"),
])
def test_combinations_that_cannot_work_are_refused_at_admission(spec, message):
    with pytest.raises(SpecError, match=re_escape(message)):
        parse_training_job(job(**spec))
    ok = parse_training_job(job(training={"strategy": "fsdp", "activationCheckpointing": True,
                                          "fsdp": {"shardAcross": "node", "cpuOffload": True}}))
    assert ok.spec.training.fsdp.shard_across == "node" and ok.spec.training.activation_checkpointing


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def settings(world: int, accumulation: int, micro: int | None = None) -> dict:
    found = {"worldSize": world, "training.gradientAccumulation": accumulation}
    if micro is not None:
        found["microBatchesPerStep"] = micro
    return {"settings": found}


@pytest.mark.parametrize("meta, spec_accumulation, world, want", [
    (None, 1, 2, 1),  # from scratch: the spec's
    (settings(2, 1), 1, 2, 1),  # same world size
    (settings(2, 1), 1, 1, 2),  # 2 -> 1: two micro-batches per step, as before
    (settings(1, 2), 2, 2, 1),  # 1 -> 2
    (settings(1, 2, micro=2), 2, 2, 1),
    (settings(4, 1), 1, 2, 2),
    (settings(2, 1), 1, 3, 1),  # 2 micro-batches do not split over 3: the spec's, and a warning
    (settings(2, 1), 4, 1, 4),  # the user changed the accumulation too: theirs
    (settings(1, 1, micro=2), 1, 2, 1),  # after an earlier 2 -> 1 resume, back to 2
])
def test_a_resume_on_another_world_size_keeps_the_micro_batches_of_a_step(meta, spec_accumulation, world, want):
    accumulation, why = accumulation_for(meta, spec_accumulation, world)
    assert accumulation == want
    if meta and meta["settings"]["worldSize"] != world and meta["settings"]["training.gradientAccumulation"] == spec_accumulation:
        assert why and f"-> {world}" in why
    else:
        assert why is None
