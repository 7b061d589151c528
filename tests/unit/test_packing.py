"""Packed batches (spec.data.packing) compute what padded batches compute, with no padding fed.

On CPU the packed attention is the block-diagonal mask path; the flash varlen path is checked on a GPU by
bench/packing_check.py (run from test_step_graphs' CUDA test when a GPU exists).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, RobertaConfig, RobertaForSequenceClassification)

from kubetrain_trainer.batching import BatchShapes, DeviceBatcher
from kubetrain_trainer.data import Encoded, collate, pack_by_budget, plan_epoch
from kubetrain_trainer.lm_loss import FusedLossLM, fused_loss, linear_cross_entropy_sum
from kubetrain_trainer.model import without_training_cache
from kubetrain_trainer.packing import PackedBatcher, PackedModel, PackedShapes, PackingError, position_offset
from kubetrain_trainer.tasks import task_for

CPU = torch.device("cpu")
CLASSIFICATION = task_for("sequence-classification")
LM = task_for("causal-lm")
SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def encoded(task, with_types: bool = False) -> Encoded:
    g = torch.Generator().manual_seed(0)
    lengths = [3, 17, 9, 2, 30, 12]
    ids = [torch.randint(5, 90, (n,), generator=g).tolist() for n in lengths]
    types = [[0] * (n // 2) + [1] * (n - n // 2) for n in lengths] if with_types else None
    labels = [i % 3 for i in range(len(lengths))] if task == CLASSIFICATION else None
    return Encoded(ids, types, labels)


def models():
    torch.manual_seed(0)
    yield "bert", CLASSIFICATION, BertForSequenceClassification(BertConfig(num_labels=3, max_position_embeddings=64, **SMALL)), True
    yield "roberta", CLASSIFICATION, RobertaForSequenceClassification(
        RobertaConfig(num_labels=3, max_position_embeddings=66, pad_token_id=1, **SMALL)), False
    yield "gpt2", LM, GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)), False
    yield "llama-gqa", LM, gqa_llama(), False


def gqa_llama() -> LlamaForCausalLM:
    """Grouped-query attention: 4 query heads share 2 key/value heads (as in Llama 3, Mistral, Qwen)."""
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        pad_token_id=0))


@pytest.mark.parametrize("shapes", [None, PackedShapes(samples=6, max_segment=32, min_step=16)], ids=["exact", "shaped"])
@pytest.mark.parametrize("name", ["bert", "roberta", "gpt2", "llama-gqa"])
def test_packed_loss_and_gradients_equal_padded(name, shapes):
    _, task, model, with_types = next(m for m in models() if m[0] == name)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    enc = encoded(task, with_types)
    indices = [4, 0, 2, 5]

    padded = collate(enc, indices, pad_id=pad)
    labels = padded.pop("labels", None)
    want, want_count = task.summed_loss(model(**padded).logits, padded, labels)
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    packed_model = PackedModel(model, task, max_segment=32)
    batch = PackedBatcher(enc, pad, CPU, task, position_offset(model), shapes)(indices)
    assert int(batch["input_ids"].ne(pad).sum()) == sum(len(enc.input_ids[i]) for i in indices)  # no pad among samples
    labels = batch.pop("labels")
    got, got_count = task.summed_loss(packed_model(**batch).logits, batch, labels)
    got.backward()

    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if task != CLASSIFICATION:
        assert int(got_count) == int(want_count) == sum(len(enc.input_ids[i]) - 1 for i in indices)
    for n, p in model.named_parameters():
        if n in want_grads:
            torch.testing.assert_close(p.grad, want_grads[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("shapes", [None, PackedShapes(samples=6, max_segment=32, min_step=16)], ids=["exact", "shaped"])
@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_a_loss_on_some_tokens_only_is_the_same_packed_padded_and_in_evaluation(name, shapes):
    """Completions and assistant turns: only the tokens marked trained are targets, the same ones in the
    evaluation's collate, the training's device batches (with dummy rows) and packed rows (with fillers)."""
    _, task, model, _ = next(m for m in models() if m[0] == name)
    plain = encoded(LM)
    rng = np.random.default_rng(1)
    trained = [rng.random(len(ids)) < 0.5 for ids in plain.input_ids]
    for mask in trained:
        mask[0] = False
    enc = Encoded(plain.input_ids, None, None, trained)
    indices = [4, 0, 2, 5]
    expected = sum(int(trained[i].sum()) for i in indices)

    def loss_and_grads(batch, forward):
        labels = batch.pop("labels")
        loss, count = task.summed_loss(forward(**batch).logits, batch, labels)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return loss.detach(), int(count), grads

    by_hand = torch.zeros(())
    logits = model(**{k: v for k, v in collate(plain, indices, pad_id=0).items()}).logits
    for row, i in enumerate(indices):
        targets = [t for t in range(1, len(enc.input_ids[i])) if trained[i][t]]
        by_hand += torch.nn.functional.cross_entropy(logits[row, [t - 1 for t in targets]].float(),
                                                     torch.tensor([int(enc.input_ids[i][t]) for t in targets]), reduction="sum")
    model.zero_grad(set_to_none=True)
    want, want_count, want_grads = loss_and_grads(collate(enc, indices, pad_id=0), model)
    torch.testing.assert_close(want, by_hand.detach(), rtol=1e-5, atol=1e-5)
    device_batch = DeviceBatcher(enc, 0, CPU, BatchShapes(width_multiple=8, rows=6))(indices)  # two dummy rows
    packed = PackedBatcher(enc, 0, CPU, task, position_offset(model), shapes)(indices)
    for batch, forward in ((device_batch, model), (packed, PackedModel(model, task, max_segment=32))):
        got, count, grads = loss_and_grads(batch, forward)
        assert count == want_count == expected
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for n, g in grads.items():
            torch.testing.assert_close(g, want_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_packed_gqa_under_bf16_autocast_equals_padded():
    """Seen on an H200: Llama's rotary embedding returns fp32 q/k under bf16 autocast, and the packed path
    then fell back to a dense mask that ignored grouped-query heads ("Attempting to broadcast a dimension")."""
    torch.manual_seed(0)
    model = gqa_llama()
    enc = encoded(LM)
    indices = [4, 0, 2, 5]
    padded = collate(enc, indices, pad_id=0)
    labels = padded.pop("labels", None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, _ = LM.summed_loss(model(**padded).logits, padded, labels)
    batch = PackedBatcher(enc, 0, CPU, LM, position_offset(model), PackedShapes(samples=6, max_segment=32, min_step=16))(indices)
    labels = batch.pop("labels")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = LM.summed_loss(PackedModel(model, LM, max_segment=32)(**batch).logits, batch, labels)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_packed_row_layout():
    enc = encoded(CLASSIFICATION)
    shapes = PackedShapes(samples=4, max_segment=8, min_step=16)
    batch = PackedBatcher(enc, 0, CPU, CLASSIFICATION, position_offset=2, shapes=shapes)([0, 2])  # 3 + 9 tokens
    used = 3 + 9 + 2  # two one-token fillers
    total = shapes.row_length(used)
    assert total % 16 == 0 and total > used
    assert batch["input_ids"].shape == batch["position_ids"].shape == (1, total)
    cu = batch["cu_seqlens"].tolist()
    assert cu[:5] == [0, 3, 12, 13, 14] and cu[-1] == total
    assert len(cu) == 5 + shapes.tail_segments(total) and max(np.diff(cu)) <= 9  # tail pieces at most max_segment
    assert batch["sample_starts"].tolist() == [0, 3, 12, 13]
    assert batch["position_ids"][0, :14].tolist() == [2, 3, 4] + list(range(2, 11)) + [2, 2]
    assert batch["labels"].tolist() == [0, 2, -100, -100]
    assert batch["cu_seqlens"].dtype == torch.int32


def test_without_a_sample_cap_sample_counts_round_to_multiples():
    enc = encoded(CLASSIFICATION)
    batcher = PackedBatcher(enc, 0, CPU, CLASSIFICATION, position_offset=0, shapes=PackedShapes(samples=0, max_segment=32))
    assert batcher.shape([0, 1, 2])[1] == batcher.shape([0, 1, 2, 3, 4])[1] == 8
    batch = batcher([0, 1, 2])
    assert batch["sample_starts"].shape == batch["labels"].shape == (8,) and batch["labels"].tolist()[3:] == [-100] * 5


def test_row_lengths_are_few_and_segment_count_fixed_per_length():
    shapes = PackedShapes(samples=256, max_segment=128)
    lengths = {shapes.row_length(t) for t in range(10_000, 15_000)}
    assert len(lengths) <= 12 and all(r > 10_000 for r in lengths)
    assert all(shapes.row_length(t) - t <= max(shapes.min_step, shapes.row_length(t) // 16) for t in range(1, 20_000, 7))


def test_lm_targets_stay_inside_each_sample():
    enc = encoded(LM)
    batch = PackedBatcher(enc, 0, CPU, LM, position_offset=0)([1, 3])  # 17 + 2 tokens
    ids, targets = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert targets[:16] == ids[1:17] and targets[16] == -100  # no target across the boundary
    assert targets[17] == ids[18] and targets[18:] == [-100] * (len(targets) - 18)


def test_packed_plan_counts_real_tokens():
    lengths = np.array([10, 50, 20, 40, 30] * 20)
    batches = pack_by_budget(range(100), lengths, max_tokens=100, max_samples=None, packed=True)
    assert all(sum(lengths[b]) <= 100 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(100))
    assert [list(b) for b in batches[:2]] == [[0, 1, 2], [3, 4, 5]]  # 80, then 40+30+10
    plan = plan_epoch(lengths, 100, None, seed=1, epoch=0, packed=True)
    assert plan == plan_epoch(lengths, 100, None, seed=1, epoch=0, packed=True)
    assert sorted(i for b in plan for i in b) == list(range(100)) and all(sum(lengths[b]) <= 100 for b in plan)


def test_unsupported_model_is_refused():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32))
    with pytest.raises(PackingError, match="distilbert"):
        PackedModel(model, CLASSIFICATION, max_segment=32)


@pytest.mark.parametrize("trainable_head", [True, False], ids=["full", "frozen-head"])
def test_the_fused_head_and_cross_entropy_equal_the_logits_path_in_chunks(trainable_head):
    """lm_loss: sum and gradients of cross-entropy(hidden @ W.T) with ignored targets, walked in chunks
    smaller than the row, equal the plain computation (a scaled backward, as under fp16's GradScaler)."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=trainable_head)
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[::5] = -100
    want = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100, reduction="sum")
    (3 * want).backward()
    want_grads = [hidden.grad.clone()] + ([weight.grad.clone()] if trainable_head else [])
    hidden.grad = weight.grad = None
    got, count = linear_cross_entropy_sum(hidden, weight, targets, chunk=8)
    (3 * got).backward()
    assert int(count) == int((targets != -100).sum())
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad, want_grads[0], rtol=1e-5, atol=1e-6)
    if trainable_head:
        torch.testing.assert_close(weight.grad, want_grads[1], rtol=1e-5, atol=1e-6)
    else:
        assert weight.grad is None


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_a_fused_loss_lm_trains_as_the_logits_path_does(name, packed):
    """The training forward of FusedLossLM (backbone, then the fused head) gives train_step the loss and
    gradients of logits + summed_loss, padded and packed; GPT-2's head is tied to its embedding."""
    _, task, model, _ = next(m for m in models() if m[0] == name)
    enc, indices = encoded(LM), [4, 0, 2, 5]
    if packed:
        batcher = PackedBatcher(enc, 0, CPU, task, position_offset(model), PackedShapes(samples=6, max_segment=32, min_step=16))
        plain, fused = PackedModel(model, task, max_segment=32), PackedModel(FusedLossLM(model), task, max_segment=32)
    else:
        batcher = DeviceBatcher(enc, 0, CPU, BatchShapes(width_multiple=8, rows=6))
        plain, fused = model, FusedLossLM(model)
    results = []
    for module, loss_fn in ((plain, None), (fused, fused_loss)):
        batch = batcher(indices)
        labels = batch.pop("labels", None)
        if loss_fn is None:
            loss, count = task.summed_loss(module(**batch).logits, batch, labels)
        else:
            loss, count = loss_fn(module, batch, labels)
        loss.backward()
        results.append((loss.detach(), int(count), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (want, want_count, want_grads), (got, got_count, grads) = results
    assert got_count == want_count == sum(len(enc.input_ids[i]) - 1 for i in indices)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for n, g in grads.items():
        torch.testing.assert_close(g, want_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_packed_attention_runs_in_autocasts_dtype_even_when_handed_fp32_q_k_v(monkeypatch) -> None:
    """transformers 5.17's Llama hands fp32 q, k and v to the attention under bf16 autocast (seen on an H200):
    packed attention must cast them to bf16 itself, as its GPU branch (flash varlen) takes only bf16/fp16;
    before, it ran the fp32 dense-mask path there at half the speed. On the CPU the same cast precedes
    the dense path, so the kernel is seen receiving bf16 (autocast would cast only inside it)."""
    import types

    import torch.nn.functional as F

    from kubetrain_trainer.packing import packed_attention

    handed = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **kw: handed.append(q.dtype) or sdpa(q, *a, **kw))

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)  # grouped-query heads
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    module = types.SimpleNamespace(is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = packed_attention(module, q, k, v, None, cu_seq_lens_q=cu, max_length_q=4)
    assert out.dtype == torch.bfloat16 and handed == [torch.bfloat16]
    expected, _ = packed_attention(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), None, cu_seq_lens_q=cu, max_length_q=4)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("name", ["bert", "roberta", "gpt2", "llama-gqa"])
def test_a_packed_forward_builds_no_attention_mask_and_reads_nothing_back(name, monkeypatch):
    """Packed attention stays inside each sample through cu_seqlens, so transformers' mask is unused. Left to
    itself, transformers looks at the packed position ids for sample starts (`(...).all()` in a Python `if`:
    one host sync per step, seen in py-spy on an H200) and then builds a [T, T] mask, 1 GiB at 32k tokens."""
    import transformers.masking_utils as masking

    looked = []
    find = masking.find_packed_sequence_indices
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda *a, **kw: looked.append(1) or find(*a, **kw))
    _, task, model, with_types = next(m for m in models() if m[0] == name)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    without_training_cache(model)  # as the trainer builds it
    enc = encoded(task, with_types)
    packed_model = PackedModel(model, task, max_segment=32)
    built = []
    monkeypatch.setitem(masking.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "kubetrain_packed",
                        lambda *a, **kw: built.append(kw["q_length"]) or masking.sdpa_mask(*a, **kw))
    batch = PackedBatcher(enc, pad, CPU, task, position_offset(model), PackedShapes(samples=6, max_segment=32, min_step=16))(
        [4, 0, 2, 5])
    labels = batch.pop("labels")
    loss, _ = task.summed_loss(packed_model(**batch).logits, batch, labels)
    assert torch.isfinite(loss)
    assert (looked, built) == ([], []), "a packed forward looked for packed sequences or built a mask"
    padded = collate(enc, [4, 0, 2, 5], pad_id=pad)  # evaluation's padded batches still get their padding mask
    padded.pop("labels", None)
    model(**padded)
    assert built, "a padded forward built no mask"
