"""GPU correctness check of whole-step CUDA graphs (`training.compile: reduce-overhead`); needs CUDA.

Runs kubetrain's real training loop in this process on a tiny BERT, bf16, and checks:
1. equivalence: without dropout, graphs train the same per-step losses and final weights as plain
   torch.compile (`compile: default`), within bf16 noise;
2. exact resume: with dropout and `deterministic: true` (GPU kernels with atomics otherwise differ from
   run to run: a second uninterrupted run is the control), a run preempted (SIGTERM) mid-way and
   resumed from its emergency checkpoint ends with weights bitwise equal to an uninterrupted run;
3. graphs were used: the trainer logged its captures.
With `--packing` every run uses `spec.data.packing`, and a fourth check compares the packed model (varlen
flash attention) with the padded one (SDPA) on the same samples: loss and gradients, bf16, RoBERTa, GPT-2
and a grouped-query Llama. With `--lm` the runs train a tiny grouped-query Llama as a causal LM on packed
rows with the fused loss, and check 1 compares graphs with `compile: regional` (the blocks compiled the
same way, each step run eagerly around them).
Prints one JSON line; exits 1 if a check fails. `tests/unit/test_step_graphs.py` runs it where CUDA exists.

    python bench/step_graphs_check.py [--work /tmp/step-graphs] [--steps 24] [--packing]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
from kubetrain_testkit import tiny  # tokenizer training, job documents


TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run(work: Path, name: str, compile: str, steps: int, *, dropout: bool, stop_after: int | None = None,
        fresh: bool = True, deterministic: bool = False, packing: bool = False, lm: bool = False
        ) -> tuple[int, list[str], Path]:
    """One in-process training run; with stop_after, SIGTERM to ourselves after that many steps."""
    from kubetrain.api import TrainingJob
    from kubetrain_trainer import loop
    from kubetrain_trainer.build import RunOptions, build_run

    config = dict(tiny.TINY_BERT, hidden_size=64, intermediate_size=128)
    if not dropout:
        config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if lm:  # grouped-query heads and rotary embeddings; dropout as asked
        config = dict(TINY_LLAMA, attention_dropout=0.1 if dropout else 0.0)
    ckpt = work / name / "ckpt"
    if fresh:
        shutil.rmtree(work / name, ignore_errors=True)
    doc = tiny.job_doc(name, work / "train.jsonl", work / "eval.jsonl", work / "tok", str(ckpt),
                       task="causal-lm" if lm else "sequence-classification", model__config=config, data__maxSamplesPerBatch=16, data__maxTokensPerBatch=16 * 64,
                       training__maxSteps=steps, training__precision="bf16", training__compile=compile,
                       data__packing=packing, training__evalEverySteps=10**6, training__deterministic=deterministic,
                       checkpoint__everySteps=10**6)
    job = TrainingJob.model_validate(doc)
    lines = Lines()
    logger = logging.getLogger("kubetrain")
    logger.addHandler(lines)
    logger.setLevel(logging.INFO)
    original, calls = loop.train_step, [0]

    def train_step(*args, **kwargs):
        out = original(*args, **kwargs)
        calls[0] += 1
        if stop_after is not None and calls[0] == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)  # what Kubernetes sends on preemption; the loop saves and exits 75
        return out

    loop.train_step = train_step
    try:
        code = loop.train(build_run(job, RunOptions(work_dir=work / name / "w", checkpoint_prefix_uri=str(ckpt / "run"),
                                                    metrics_port=None)))
    finally:
        loop.train_step = original
        logger.removeHandler(lines)
    return code, lines.lines, ckpt


def losses(lines: list[str]) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(2)) for line in lines if (m := re.search(r"step (\d+)/\d+ .*\| loss (\S+)", line))}


def final_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    final = max(ckpt.rglob("model.pt"), key=lambda p: p.parent.name)
    return torch.load(final, map_location="cpu", weights_only=True)


def packed_matches_padded() -> dict:
    """Loss and gradients of one batch, packed (flash varlen) against padded (SDPA), bf16 autocast, no dropout."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, RobertaConfig,
                              RobertaForSequenceClassification)

    from kubetrain_trainer.data import Encoded, collate
    from kubetrain_trainer.packing import PackedBatcher, PackedModel, position_offset
    from kubetrain_trainer.tasks import task_for

    cuda, out = torch.device("cuda"), {}
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 129, (24,), generator=g).tolist()
    ids = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in lengths]
    torch.manual_seed(0)
    cases = {
        "roberta": (task_for("sequence-classification"), RobertaForSequenceClassification(RobertaConfig(
            vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
            max_position_embeddings=130, pad_token_id=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            num_labels=3))),
        "gpt2": (task_for("causal-lm"), GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_embd=256, n_layer=2, n_head=4, n_positions=128,
                                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0))),
        # grouped-query attention (8 query heads, 2 key/value heads) and rotary embeddings in fp32 under autocast
        "llama-gqa": (task_for("causal-lm"), LlamaForCausalLM(LlamaConfig(
            vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0))),
    }
    for name, (task, model) in cases.items():
        model = model.to(cuda)
        pad = model.config.pad_token_id
        enc = Encoded(ids, None, [i % 3 for i in range(len(ids))] if name == "roberta" else None)

        def loss_and_grads(module, batch):
            labels = batch.pop("labels", None)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = module(**batch).logits
            loss, _ = task.summed_loss(logits, batch, labels)
            loss.backward()
            grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
            model.zero_grad(set_to_none=True)
            return float(loss), grads

        want, want_grads = loss_and_grads(model, {k: v.to(cuda) for k, v in collate(enc, range(len(ids)), pad).items()})
        packed = PackedModel(model, task, max_segment=128)
        got, got_grads = loss_and_grads(packed, PackedBatcher(enc, pad, cuda, task, position_offset(model))(range(len(ids))))
        # over all gradients at once: some are exactly zero in exact arithmetic (attention key biases), pure bf16 noise
        difference = torch.cat([(got_grads[n] - want_grads[n]).flatten() for n in want_grads]).norm()
        relative = float(difference / torch.cat([g.flatten() for g in want_grads.values()]).norm())
        out[name] = {"loss_padded": want, "loss_packed": got, "relative_grad_difference": relative,
                     "ok": abs(got - want) <= 0.01 * abs(want) and relative < 0.02}
    return {"ok": all(c["ok"] for c in out.values()), **out}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/step-graphs"))
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--packing", action="store_true", help="packed batches (varlen flash attention) in every run")
    p.add_argument("--lm", action="store_true", help="a causal LM with the fused loss, packed (implies --packing)")
    args = p.parse_args(argv)
    args.packing = args.packing or args.lm
    if not torch.cuda.is_available():
        sys.exit("step_graphs_check needs CUDA")
    logging.basicConfig(level=logging.WARNING)
    work, steps = args.work, args.steps
    work.mkdir(parents=True, exist_ok=True)
    tiny.write_corpus(work, n_train=600, n_eval=40)
    tiny.train_tokenizer(work / "tok", work / "train.jsonl")
    checks: dict[str, dict] = {}
    if args.packing and not args.lm:
        checks["flash_packed_matches_padded"] = packed_matches_padded()
    packing = {"packing": args.packing, "lm": args.lm}

    code_a, plain, ckpt_a = run(work, "plain", "regional" if args.lm else "default", steps, dropout=False, **packing)
    code_b, graphed, ckpt_b = run(work, "graphed", "reduce-overhead", steps, dropout=False, **packing)
    la, lb = losses(plain), losses(graphed)
    wa, wb = final_weights(ckpt_a), final_weights(ckpt_b)
    worst = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    checks["equivalent_to_plain_compile"] = {
        "ok": code_a == code_b == 0 and sorted(la) == sorted(lb) == list(range(1, steps + 1))
        and all(abs(la[s] - lb[s]) <= 0.02 * abs(la[s]) + 1e-3 for s in la) and worst < 5e-2,
        "losses_plain": [la[s] for s in sorted(la)], "losses_graphed": [lb[s] for s in sorted(lb)],
        "max_weight_difference": worst}
    captured = [line for line in graphed if line.startswith("graphs: captured")]
    checks["graphs_used"] = {"ok": bool(captured) and not any("new batch shape" in line for line in graphed),
                             "log": captured}

    exact = dict(dropout=True, deterministic=True, **packing)
    code_s, straight, ckpt_s = run(work, "straight", "reduce-overhead", steps, **exact)
    code_c, _, ckpt_c = run(work, "straight-again", "reduce-overhead", steps, **exact)
    control = [k for k, v in final_weights(ckpt_c).items() if not torch.equal(v, final_weights(ckpt_s)[k])]
    checks["deterministic_control"] = {"ok": code_c == 0 and not control, "tensors_different": control[:10]}
    code_1, first, ckpt_p = run(work, "preempted", "reduce-overhead", steps, stop_after=steps // 2, **exact)
    code_2, second, _ = run(work, "preempted", "reduce-overhead", steps, fresh=False, **exact)
    resumed = next((int(m.group(1)) for line in second if (m := re.search(r"resumed from \S+ at step (\d+)", line))), None)
    ws, wp = final_weights(ckpt_s), final_weights(ckpt_p)
    different = [k for k in ws if not torch.equal(ws[k], wp[k])]
    ls, l2 = losses(straight), losses(second)
    checks["exact_resume"] = {
        "ok": (code_s, code_1, code_2) == (0, 75, 0) and resumed == steps // 2 and not different
        and all(l2[s] == ls[s] for s in l2),
        "exits": [code_s, code_1, code_2], "resumed_at": resumed, "tensors_different": different[:10],
        "losses_after_resume_equal": all(l2[s] == ls[s] for s in l2)}
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": steps, "packing": args.packing, "lm": args.lm,
              "ok": all(c["ok"] for c in checks.values()), "checks": checks}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
