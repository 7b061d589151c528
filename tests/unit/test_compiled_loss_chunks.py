"""The fused LM loss's chunk softmax and gradient through torch.compile (training.compile on) compute what
the eager chunk computes, also when the head runs inside a whole-model compile (its frame is excluded from
the model's graph, the chunk function is a graph of its own)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kubetrain_trainer.lm_loss import (FusedLossLM, chunk_loss_and_grad, chunk_tokens, compiled_chunk_loss_and_grad,
                                       fused_loss)


def compiled_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_chunk_equals_the_eager_one(dtype):
    g = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    for rows in (13, 7):  # the last chunk of a step is shorter: one dynamic graph for both
        logits = (4 * torch.randn(rows, 50, generator=g)).to(dtype)
        targets = torch.randint(0, 50, (rows,), generator=g)
        targets[::3] = -100
        want_loss, want_grad = chunk_loss_and_grad(logits, targets)
        got_loss, got_grad = compiled_chunk_loss_and_grad()(logits, targets)
        assert got_grad.dtype == dtype and got_grad.shape == logits.shape
        torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-5)
        assert not got_grad[targets == -100].any()
    reference = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(got_loss, reference, rtol=1e-5, atol=1e-5)


def test_chunks_hold_at_most_2_gib_of_fp32_logits():
    assert chunk_tokens(128256) == 4096 and chunk_tokens(49152) == 10240 and chunk_tokens(10**7) == 1024
    assert all(chunk_tokens(v) * v * 4 <= 2**31 for v in (32000, 49152, 128256, 151936, 262144))


def test_a_compiled_model_with_the_compiled_loss_trains_as_the_eager_one():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 96, (2, 24))
    targets = torch.roll(ids, -1, dims=1)
    targets[:, -1], targets[0, :5] = -100, -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    results, graphs = [], {}
    for model_compiled, loss_compiled in ((False, False), (True, False), (True, True)):
        torch._dynamo.reset()
        fused = FusedLossLM(model, compiled=loss_compiled)
        module = torch.compile(fused, dynamic=True) if model_compiled else fused
        before = compiled_graphs()
        loss, count = fused_loss(module, dict(batch), targets)
        loss.backward()
        results.append((loss.detach(), int(count), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
        graphs[model_compiled, loss_compiled] = compiled_graphs() - before
    assert graphs[True, True] > graphs[True, False] > 0, graphs  # the chunk function is a graph of its own
    results = [results[0], results[2]]
    (want, want_count, want_grads), (got, got_count, grads) = results
    assert got_count == want_count == int((targets != -100).sum())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
