"""Large models on one GPU, kubetrain against Hugging Face Trainer + PEFT on the same settings.

Cases (Llama shapes, random init from config; a 128256-token embedding as Llama 3 has, the data using
the first few thousand ids of a WordPiece tokenizer trained on the fly):
- `1b-fsdp`, `1b-fsdp-ac`: a ~1.2B Llama (hidden 2048, 16 layers, 32 heads, 8 kv heads) fully fine-tuned,
  kubetrain with training.strategy fsdp at world size 1, without and with activation checkpointing;
  HF Trainer without FSDP (at world size 1 there is nothing to shard) with gradient_checkpointing to match;
- `8b-lora`: an 8B Llama (hidden 4096, 32 layers, 32 heads, 8 kv heads) with LoRA r=16 on every linear
  layer, the frozen base in bf16, activation checkpointing on both sides;
- `8b-qlora`: the same 8B saved once to local disk, then loaded 4-bit (NF4, double quantization, bf16
  compute) through bitsandbytes by both sides;
- `tiny`: a 2-layer Llama on the CPU, seconds (the test suite runs it).
Every side: bf16 autocast, fused AdamW, lr warmup then linear decay, clip 1.0, `--batch` samples of
`--seq` tokens per step, `--warmup + --steps` steps; timed over the `--steps` after the warm-up,
bracketed by device syncs. Peak memory is torch.cuda.max_memory_allocated over the whole process
(model building included). kubetrain's checkpoint stall (fsdp): the final save's and a second staging of
the same state, as every later periodic save stalls, split into its parts, beside DCP's DefaultStager.

    python bench/large_models.py --all --out bench/results/large_models.json   # each case and side in its own process
    python bench/large_models.py --case 8b-lora --side kubetrain                 # one, printed as JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from kubetrain_testkit import tiny
from kubetrain_testkit.synthetic import make_rows, words, write_jsonl  # the corpus bench/hf_compare.py uses

LLAMA = {"model_type": "llama", "vocab_size": 128256, "max_position_embeddings": 4096, "rope_theta": 500000.0,
         "tie_word_embeddings": False}
SHAPES = {
    "1b": dict(LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "8b": dict(LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
    "tiny": {"model_type": "llama", "vocab_size": 5000, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256},
}
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass(frozen=True)
class Case:
    shape: str
    strategy: str = "ddp"
    lora: bool = False
    quantization: str = "none"
    activation_checkpointing: bool = False


CASES = {
    "1b-fsdp": Case("1b", "fsdp"),
    "1b-fsdp-ac": Case("1b", "fsdp", activation_checkpointing=True),
    "8b-lora": Case("8b", lora=True, activation_checkpointing=True),
    "8b-qlora": Case("8b", lora=True, quantization="4bit", activation_checkpointing=True),
    "tiny": Case("tiny", "fsdp", lora=False, activation_checkpointing=True),
}
LEARNING_RATE = 2e-5
log = logging.getLogger("large_models")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def corpus(work: Path, seq: int, rows: int) -> tuple[Path, Path]:
    """Rows of at least `seq` one-token words, and a WordPiece tokenizer that knows each word."""
    train = work / "data" / f"train-{seq}.jsonl"
    tok = work / "data" / "tokenizer"
    if not train.exists():
        vocab = words(4000)
        write_jsonl([{"text": r["text"]} for r in make_rows(rows, vocab, seed=1, median_words=seq * 1.5, sigma=0.1)], train)
    if not tok.exists():
        tiny.train_tokenizer(tok, train, vocab_size=4200)
    return train, tok


def model_spec(case: Case, pretrained: Path | None) -> dict:
    spec = {"task": "causal-lm", "quantization": case.quantization}
    if pretrained:
        spec["name"] = str(pretrained)
    else:
        spec["config"] = SHAPES[case.shape]
    if case.lora:
        spec["lora"] = {"r": 16, "alpha": 32, "targetModules": LINEAR}
    return spec


def pretrained_8b(work: Path) -> Path:
    """The 8B written once (bf16 safetensors) so both sides can load it quantized, as users load theirs."""
    out = work / "llama-8b"
    if not (out / "config.json").exists():
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(**SHAPES["8b"])
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(out, max_shard_size="5GB")
        del model
        torch.cuda.empty_cache()
    return out


class StepTimes(logging.Handler):
    """The trainer's step log lines (each written after a device sync) with their time."""

    def __init__(self):
        super().__init__()
        self.at: dict[int, float] = {}
        self.losses: dict[int, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if m := re.search(r"step (\d+)/\d+ .*\| loss (\S+)", record.getMessage()):
            self.at[int(m.group(1))] = time.perf_counter()
            self.losses[int(m.group(1))] = float(m.group(2))


def run_kubetrain(case: Case, args, work: Path, train: Path, tok: Path, pretrained: Path | None) -> dict:
    from kubetrain.api import parse_training_job
    from kubetrain_trainer import loop
    from kubetrain_trainer.build import RunOptions, build_run

    steps = args.warmup + args.steps
    doc = tiny.job_doc("bench", train, None, tok, str(work / "ckpt"), task="causal-lm")
    doc["spec"]["model"] = {**model_spec(case, pretrained), "tokenizer": str(tok)}
    doc["spec"]["data"].update(maxLength=args.seq, maxTokensPerBatch=args.batch * args.seq, maxSamplesPerBatch=args.batch)
    doc["spec"]["training"].update(maxSteps=steps, learningRate=LEARNING_RATE, warmupSteps=args.warmup,
                                   precision="bf16" if device().type == "cuda" else "fp32", strategy=case.strategy,
                                   activationCheckpointing=case.activation_checkpointing, logEverySteps=args.warmup,
                                   fusedLoss=args.fused_loss)
    doc["spec"]["checkpoint"].update(everySteps=10**6, keep=1)
    doc["spec"].pop("metrics", None)
    shutil.rmtree(work / "ckpt", ignore_errors=True)
    job = parse_training_job(doc)
    times = StepTimes()
    logging.getLogger("kubetrain.progress").addHandler(times)
    run = build_run(job, RunOptions(work_dir=work / "kt", checkpoint_prefix_uri=str(work / "ckpt"), metrics_port=None))
    assert loop.train(run) == 0
    peak = torch.cuda.max_memory_allocated() / 2**30 if device().type == "cuda" else None
    stall = sharded_stall(run.checkpointer, work / "kt" / "again") if run.checkpointer.shards is not None else {}
    seconds = times.at[steps] - times.at[args.warmup]
    tokens = args.steps * args.batch * args.seq
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    return {"fused_loss": args.fused_loss, "tokens_per_s": tokens / seconds, "peak_gib": peak, "loss_first": times.losses.get(args.warmup),
            "loss_last": times.losses.get(steps), "trainable_params": trainable, "checkpoint_stall": stall or None}


def sharded_stall(checkpointer, again: Path) -> dict:
    """The final save's stall, then a second staging of the same state (as every later periodic save stalls),
    split into DCP's state_dict() and our copy to host, beside DCP's DefaultStager on the same state."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    from kubetrain_trainer.sharded_checkpoint import SHARDS_DIR

    def timed(fn):
        started = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - started

    shards = checkpointer.shards
    stall = {"first_s": checkpointer.latest.meta.get("stall_seconds")}
    written, stall["steady_s"] = timed(lambda: shards.stage(again))
    written.result()
    shutil.rmtree(again, ignore_errors=True)  # 18 GB at 1B: the device's disk is 64 GiB
    state, stall["state_dict_s"] = timed(shards.component.state_dict)
    _, stall["copy_to_host_s"] = timed(lambda: shards.stager.stage({SHARDS_DIR: state}))  # the saves' own keys
    stall["staged_gb"] = shards.stager.staged_bytes() / 1e9
    on_gpu = torch.cuda.is_available()
    default = DefaultStager(StagingOptions(use_pinned_memory=on_gpu, use_shared_memory=False, use_async_staging=False,
                                           use_non_blocking_copy=on_gpu))
    for attempt in ("first", "second"):  # DCP's own stager, kept across the two
        state = shards.component.state_dict()
        try:
            _, stall[f"dcp_default_stager_{attempt}_s"] = timed(lambda: default.stage(state))
        except Exception as err:  # noqa: BLE001 - torch 2.11's stager cannot copy some DTensor attributes
            stall[f"dcp_default_stager_{attempt}_s"] = f"failed: {type(err).__name__}: {err}"
    return stall


def run_hf(case: Case, args, work: Path, train: Path, tok: Path, pretrained: Path | None) -> dict:
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer,
                              TrainerCallback, TrainingArguments, default_data_collator)

    on_gpu = device().type == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(tok)
    texts = [json.loads(line)["text"] for line in train.read_text().splitlines()]
    enc = tokenizer(texts, truncation=True, max_length=args.seq, padding="max_length")
    rows = [{"input_ids": ids, "attention_mask": mask, "labels": [t if m else -100 for t, m in zip(ids, mask, strict=True)]}
            for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    if case.quantization == "4bit":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=torch.bfloat16, quantization_config=quant,
                                                     device_map={"": 0})
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=case.activation_checkpointing)
    else:
        config = AutoConfig.for_model(**SHAPES[case.shape])
        config.pad_token_id = tokenizer.pad_token_id
        with torch.device(device()):  # as the HF/PEFT recipes do: a LoRA base in bf16, a full fine-tune in fp32
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if case.lora and on_gpu else torch.float32)
    if case.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, target_modules=LINEAR))
    steps, warmup = args.warmup + args.steps, args.warmup
    clock: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step in (warmup, steps):
                if on_gpu:
                    torch.cuda.synchronize()
                clock[state.global_step] = time.perf_counter()

    targs = TrainingArguments(output_dir=str(work / "hf"), per_device_train_batch_size=args.batch, max_steps=steps,
                              learning_rate=LEARNING_RATE, warmup_steps=warmup, lr_scheduler_type="linear",
                              max_grad_norm=1.0, bf16=on_gpu, logging_steps=steps, save_strategy="no", report_to=[],
                              disable_tqdm=True, optim="adamw_torch_fused" if on_gpu else "adamw_torch", use_cpu=not on_gpu,
                              gradient_checkpointing=case.activation_checkpointing,
                              gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=default_data_collator, callbacks=[Clock()])
    out = trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"tokens_per_s": args.steps * args.batch * args.seq / (clock[steps] - clock[warmup]), "peak_gib": peak,
            "loss_mean": out.training_loss, "trainable_params": trainable}


def one(args) -> dict:
    case = CASES[args.case]
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    train, tok = corpus(work, args.seq, rows=max(64, (args.warmup + args.steps) * args.batch))
    pretrained = pretrained_8b(work) if case.quantization != "none" else None
    torch.manual_seed(0)
    if device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        result = (run_kubetrain if args.side == "kubetrain" else run_hf)(case, args, work, train, tok, pretrained)
        return {"case": args.case, "side": args.side, "ok": True, **dataclasses.asdict(case), **result}
    except torch.OutOfMemoryError as err:
        return {"case": args.case, "side": args.side, "ok": False, "error": f"out of memory: {str(err).splitlines()[0]}"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=sorted(CASES))
    p.add_argument("--side", choices=["kubetrain", "hf"])
    p.add_argument("--all", nargs="*", metavar="CASE", help="every case (or these), each side in its own process")
    p.add_argument("--sides", nargs="+", default=["kubetrain", "hf"], help="with --all")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--work", type=Path, default=Path("/tmp/large-models"))
    p.add_argument("--out", type=Path)
    p.add_argument("--fused-loss", choices=["auto", "off"], default="auto", help="kubetrain: training.fusedLoss")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.all is None:
        result = one(args)
        print("RESULT " + json.dumps(result), flush=True)
        return result
    rows = []
    for name in args.all or [c for c in CASES if c != "tiny"]:
        for side in args.sides:
            cmd = [sys.executable, __file__, "--case", name, "--side", side, "--batch", str(args.batch), "--seq",
                   str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup), "--work", str(args.work)]
            started = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            found = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            row = found[0] if found else {"case": name, "side": side, "ok": False,
                                          "error": (proc.stderr or proc.stdout)[-1500:]}
            row["wall_s"] = round(time.time() - started, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "batch": args.batch, "seq": args.seq, "steps": args.steps,
              "warmup": args.warmup, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
