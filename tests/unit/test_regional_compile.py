"""`training.compile: regional`: every transformer block compiled, sharing one graph, training as eager does."""

from __future__ import annotations

import copy

import torch
from torch._dynamo.utils import counters

from kubetrain.api import DataSpec
from kubetrain_trainer.compile import compile_for_training
from kubetrain_trainer.model import without_training_cache

DATA = DataSpec.model_validate({"train": "x.jsonl", "maxLength": 64})


def tiny_llama(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).float()


def loss_and_grads(model, input_ids):
    model.zero_grad()
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_regional_compile_trains_every_block_through_one_graph_as_eager_does():
    eager = tiny_llama(layers=4)
    model = copy.deepcopy(eager)
    without_training_cache(model)  # as build.prepare does: with a cache, each block guards on its layer index
    assert not model.config.use_cache
    torch._dynamo.reset()
    counters.clear()
    compiled = compile_for_training(model, "regional", DATA, world_size=1, grad_accum=1, device=torch.device("cpu"),
                                    precision="fp32")
    assert compiled.module is model and compiled.shapes is None  # in place, any batch shape
    torch.manual_seed(1)
    for length in (16, 24):  # a second length: dynamic shapes, no recompile per length
        input_ids = torch.randint(0, 128, (2, length))
        want_loss, want_grads = loss_and_grads(eager, input_ids)
        loss, grads = loss_and_grads(model, input_ids)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
        for name, grad in want_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # 4 blocks, 2 lengths: compiled once
    assert all(getattr(layer.forward, "_torchdynamo_orig_callable", None) for layer in model.model.layers)
    assert list(model.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys


def test_regional_compile_falls_back_to_whole_model_compile_without_transformer_blocks():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    compiled = compile_for_training(model, "regional", DATA, world_size=1, grad_accum=1, device=torch.device("cpu"),
                                    precision="fp32")
    assert compiled.module is not model and compiled.module._orig_mod is model
