"""Whole-step CUDA graphs (`training.compile: reduce-overhead`): where they apply, and on a GPU that they are exact."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from kubetrain.api import DataSpec
from kubetrain_trainer.compile import compile_for_training
from kubetrain_testkit import REPO

DATA = DataSpec.model_validate({"train": "x.jsonl", "maxLength": 128, "maxSamplesPerBatch": 32})


@pytest.mark.parametrize("device, world_size, grad_accum, precision", [
    ("cpu", 1, 1, "bf16"),  # no GPU
    ("cuda", 2, 1, "bf16"),  # DDP
    ("cuda", 1, 2, "bf16"),  # gradient accumulation
    ("cuda", 1, 1, "fp16"),  # GradScaler reads found-inf on the host
])
def test_step_graphs_fall_back_to_plain_compile_where_they_cannot_apply(device, world_size, grad_accum, precision):
    compiled = compile_for_training(torch.nn.Linear(2, 2), "reduce-overhead", DATA, world_size=world_size,
                                    grad_accum=grad_accum, device=torch.device(device), precision=precision)
    assert not compiled.step_graphs
    assert compiled.shapes.rows == 1, "plain compile: batches keep their own row count"


def test_step_graphs_are_chosen_on_one_gpu_with_fixed_batch_shapes():
    compiled = compile_for_training(torch.nn.Linear(2, 2), "reduce-overhead", DATA, world_size=1, grad_accum=1,
                                    device=torch.device("cuda"), precision="bf16")
    assert compiled.step_graphs
    shapes = compiled.shapes
    assert (shapes.rows, shapes.width_multiple) == (32, 8) and shapes.width(41) == 48
    assert compile_for_training(torch.nn.Linear(2, 2), "off", DATA, world_size=1, grad_accum=1,
                                device=torch.device("cuda"), precision="bf16").module.__class__ is torch.nn.Linear


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device: see BENCHMARKS.md)")
@pytest.mark.parametrize("flags", [[], ["--packing"], ["--lm"]], ids=["padded", "packed", "packed-lm-fused-loss"])
def test_step_graphs_train_like_plain_compile_and_resume_bitwise(tmp_path, flags):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "step_graphs_check.py"), "--work", str(tmp_path), *flags],
                         capture_output=True, text=True, timeout=900)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["ok"], json.dumps(result["checks"], indent=1)[:4000]


def test_a_model_computing_its_own_loss_is_compiled_per_block_under_the_step_graphs():
    """The fused causal-LM loss: the graphs capture regional blocks (seconds to compile), not a whole-LM compile."""
    from transformers import LlamaConfig, LlamaForCausalLM

    packed = DataSpec.model_validate({"train": "x.jsonl", "maxLength": 128, "packing": True})
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1))
    compiled = compile_for_training(model, "reduce-overhead", packed, world_size=1, grad_accum=1,
                                    device=torch.device("cuda"), precision="bf16", loss_in_forward=True)
    assert compiled.step_graphs and compiled.module is model, "no whole-model wrapper"
    assert all(hasattr(layer.forward, "_torchdynamo_orig_callable") for layer in model.model.layers)
    assert compiled.shapes.row_length(1000) % 64 == 0, "few row lengths for the graphs"
    whole = compile_for_training(LlamaForCausalLM(model.config), "reduce-overhead", packed, world_size=1, grad_accum=1,
                                 device=torch.device("cuda"), precision="bf16")
    assert whole.step_graphs and whole.module is not model, "logits path: the whole model compiled"
