"""training.fusedLoss on a GPU: the fused LM head + cross-entropy (lm_loss) against full logits, one
forward+backward of a Llama-shaped LM with Llama 3's 128k vocabulary, bf16 autocast.

Reports the loss and gradient agreement, peak memory and time of each path over the same batch.

    python bench/fused_loss_check.py --out bench/results/fused_loss_check.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kubetrain_trainer.lm_loss import FusedLossLM, fused_loss
from kubetrain_trainer.tasks import task_for

SHAPE = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
         "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 4096,
         "tie_word_embeddings": False}


def run(model, batch, fused: bool, repeats: int) -> dict:
    lm = task_for("causal-lm")
    module = FusedLossLM(model) if fused else model
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if fused:
                loss, count = fused_loss(module, dict(batch), None)
            else:
                loss, count = lm.summed_loss(module(**batch).logits, batch, None)
        (loss / count).backward()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if n in ("lm_head.weight", "model.embed_tokens.weight")}
    return {"loss": float(loss / count), "seconds": min(times), "peak_over_weights_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
            "grads": grads}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out")
    a = p.parse_args()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**SHAPE), dtype=torch.float32)
    ids = torch.randint(0, SHAPE["vocab_size"], (a.tokens // 1024, 1024), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    plain, fused = run(model, batch, False, a.repeats), run(model, batch, True, a.repeats)
    rel = {n: float((fused["grads"][n] - plain["grads"][n]).norm() / plain["grads"][n].norm()) for n in plain["grads"]}
    result = {"shape": SHAPE, "tokens": a.tokens, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "plain": {k: v for k, v in plain.items() if k != "grads"}, "fused": {k: v for k, v in fused.items() if k != "grads"},
              "loss_rel_diff": abs(fused["loss"] - plain["loss"]) / abs(plain["loss"]), "grad_rel_diff": rel}
    print(json.dumps(result, indent=1))
    if a.out:
        open(a.out, "w").write(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
