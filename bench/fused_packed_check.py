"""GPU check of a causal LM trained packed (varlen flash attention) through the fused head + cross-entropy
(training.fusedLoss), against padded rows through full logits (SDPA), bf16: loss and gradients, with a
loss on some tokens only (chat answers) and on every token. Prints one JSON line; exits 1 if a check fails.

    python bench/fused_packed_check.py
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kubetrain_trainer.batching import DeviceBatcher
from kubetrain_trainer.data import Encoded
from kubetrain_trainer.lm_loss import FusedLossLM, fused_loss
from kubetrain_trainer.packing import PackedBatcher, PackedModel, PackedShapes, position_offset
from kubetrain_trainer.tasks import task_for

TOLERANCE = {"loss": 1e-2, "grad": 5e-2}  # relative, bf16


def check(masked: bool) -> dict:
    torch.manual_seed(0)
    device = torch.device("cuda")
    lm = task_for("causal-lm")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                                         pad_token_id=0)).to(device)
    rng = np.random.default_rng(0)
    ids = [rng.integers(5, 32000, n).tolist() for n in (37, 200, 90, 5, 300, 128)]
    trained = None
    if masked:
        trained = [np.arange(len(r)) >= len(r) // 2 for r in ids]  # the second half of each sample: its "answer"
    enc = Encoded(ids, None, None, trained)
    indices = list(range(len(ids)))
    results = {}
    for name in ("padded", "packed"):
        if name == "padded":
            module, batch = model, DeviceBatcher(enc, 0, device)(indices)
        else:
            module = PackedModel(FusedLossLM(model), lm, max_segment=512)
            batch = PackedBatcher(enc, 0, device, lm, position_offset(model), PackedShapes(samples=8, max_segment=512))(indices)
        labels = batch.pop("labels", None)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if name == "padded":
                loss, count = lm.summed_loss(module(**batch).logits, batch, labels)
            else:
                loss, count = fused_loss(module, batch, labels)
        loss.backward()
        results[name] = (float(loss), int(count), {n: p.grad.float().clone() for n, p in model.named_parameters()})
        model.zero_grad(set_to_none=True)
    (want, want_count, want_grads), (got, got_count, grads) = results["padded"], results["packed"]
    worst = max(float((grads[n] - want_grads[n]).norm() / want_grads[n].norm().clamp(min=1e-12)) for n in grads)
    loss_rel = abs(got - want) / abs(want)
    return {"masked": masked, "loss_padded": want, "loss_packed_fused": got, "count": [want_count, got_count],
            "loss_rel": loss_rel, "worst_grad_rel": worst,
            "ok": want_count == got_count and loss_rel < TOLERANCE["loss"] and worst < TOLERANCE["grad"]}


def main() -> None:
    rows = [check(False), check(True)]
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "checks": rows}))
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
