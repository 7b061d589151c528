"""Causal-LM fine-tuning speed: kubetrain against Hugging Face Trainer, same weights, data, batch and steps, one GPU.

Data: documents of one-token words with lognormal lengths (median ~200 tokens, sigma 0.8, cut at 1,024),
a WordPiece tokenizer trained on them. `--sft`: each document split into a prompt (its first ~30 %) and a
completion, loss on the completion only (kubetrain `data.style: prompt-completion`; HF labels -100 on the
prompt, as TRL's completion-only collators do). Models: random-init Llama shapes with a 49,152 vocabulary
and tied embeddings: `135m` (SmolLM2-135M: hidden 576, 30 layers, 9/3 heads) and `1b` (hidden 2048,
16 layers, 32/8 heads, MLP 8192: 1.07B).
Sides, each in its own process (no compiled graphs, allocator state or peak counter shared):
- `hf-default`: Trainer, DataCollatorForLanguageModeling (padding to the batch's longest), SDPA;
- `hf-grouped`: + group_by_length; `hf-grouped-compiled`: + torch_compile; `hf-grouped-no-cudnn`: + cuDNN's
  SDPA backend off (PyTorch picks it on an H200, and it builds a graph on the host per new padded shape);
- `hf-flatten`: DataCollatorWithFlattening (padding-free, position_ids; transformers builds the per-document
  causal mask); `hf-flatten-fa2` with flash_attention_2 where the flash-attn package is installed;
- `kubetrain`: packed (`data.packing`, varlen flash attention), `training.batchSize` = the same samples per step,
  fused LM loss (`fusedLoss: auto`), compile off; `kubetrain-compiled`: the same with `compile: default`;
  `kubetrain-regional`: with `compile: regional` (each decoder layer compiled, one graph for all);
  `kubetrain-graphs`: `compile: reduce-overhead` (regional blocks, fused loss, the whole step one CUDA graph per
  row shape).
liger-kernel sides run where liger_kernel imports (`hf-grouped-liger`, `hf-flatten-liger`).
Every side: bf16 autocast, fused AdamW, lr warmup then linear decay, clip 1.0, `--batch` samples per step,
`--warmup + --steps` steps, timed over the `--steps` after the warm-up, bracketed by device syncs. Real tokens
are non-pad tokens. MFU = 6N x real tokens/s over the bf16 datasheet peak. Eval loss: mean cross-entropy per
trained token over the same held-out documents, the same function for every side.

    python bench/lm_compare.py --shape 135m --out bench/results/lm_compare_135m.json   # every side
    python bench/lm_compare.py --tiny                                                   # CPU, seconds (tests)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from kubetrain_testkit import tiny
from kubetrain_testkit.benchkit import StepLog, SyncSites, peak_memory_gib, sync
from kubetrain_testkit.synthetic import make_rows, words, write_jsonl

LLAMA = {"model_type": "llama", "vocab_size": 49152, "max_position_embeddings": 2048, "tie_word_embeddings": True,
         "rope_theta": 100000.0}
SHAPES = {
    "135m": dict(LLAMA, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3),
    "1b": dict(LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "tiny": {"model_type": "llama", "vocab_size": 2000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": True},
}
HF_SIDES = ["hf-default", "hf-grouped", "hf-grouped-no-cudnn", "hf-flatten", "hf-flatten-fa2", "hf-grouped-compiled", "hf-grouped-liger",
            "hf-flatten-liger"]
SIDES = [*HF_SIDES, "kubetrain", "kubetrain-compiled", "kubetrain-regional", "kubetrain-graphs"]
KUBETRAIN_COMPILE = {"kubetrain": "off", "kubetrain-compiled": "default", "kubetrain-regional": "regional",
                     "kubetrain-graphs": "reduce-overhead"}
LEARNING_RATE = 1e-4
log = logging.getLogger("lm_compare")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- data ----------------------------------------------------------------------------------------

def corpus(args) -> dict[str, Path]:
    """train/eval JSONL (text, or prompt + completion with --sft) and a tokenizer that maps each word to one token."""
    work = args.work / "data"
    files = {"train": work / f"train-{args.rows}.jsonl", "eval": work / "eval.jsonl", "tok": work / "tokenizer"}
    if all(p.exists() for p in files.values()):
        return files
    vocab = words(1500 if args.tiny else 8000)
    median = 30 if args.tiny else 200
    for name, n, seed in (("train", args.rows, 1), ("eval", args.eval_rows, 2)):
        rows = make_rows(n, vocab, seed=seed, median_words=median, sigma=0.8)
        write_jsonl([{"text": r["text"], **split_prompt(r["text"])} for r in rows], files[name])
    tiny.train_tokenizer(files["tok"], files["train"], vocab_size=len(vocab) + 200)
    return files


def split_prompt(text: str) -> dict:
    words_ = text.split(" ")
    cut = max(1, int(len(words_) * 0.3))
    return {"prompt": " ".join(words_[:cut]), "completion": " " + " ".join(words_[cut:])}


def encode(tokenizer, rows: list[dict], sft: bool, max_length: int) -> list[dict]:
    """input_ids and labels (-100 where the loss does not count) per document, cut at max_length."""
    out = []
    for r in rows:
        if sft:
            prompt = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
            completion = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
            ids = ([tokenizer.cls_token_id] + prompt + completion)[:max_length]
            labels = ([-100] * (1 + len(prompt)) + completion)[:max_length]
        else:
            ids = tokenizer(r["text"], truncation=True, max_length=max_length)["input_ids"]
            labels = list(ids)
        out.append({"input_ids": ids, "labels": labels})
    return out


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@torch.no_grad()
def eval_loss(model, docs: list[dict], batch: int = 16) -> float:
    """Mean cross-entropy per trained token (labels != -100, shifted), over the held-out documents."""
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]["input_ids"]))
    for start in range(0, len(order), batch):
        part = [docs[i] for i in order[start : start + batch]]
        width = max(len(d["input_ids"]) for d in part)
        ids = torch.zeros(len(part), width, dtype=torch.long)
        labels = torch.full((len(part), width), -100, dtype=torch.long)
        mask = torch.zeros(len(part), width, dtype=torch.long)
        for row, d in enumerate(part):
            n = len(d["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(d["input_ids"]), torch.tensor(d["labels"]), 1
        with torch.autocast(device().type, dtype=torch.bfloat16, enabled=device().type == "cuda"):
            logits = model(input_ids=ids.to(device()), attention_mask=mask.to(device())).logits
        targets = labels[:, 1:].to(device())
        total += torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=-100,
                                                   reduction="sum").item()
        count += int((targets != -100).sum())
    model.train()
    return total / count


def initial_model(shape: str, seed: int):
    """The same initial weights for every side (fp32 master weights, as both trainers keep)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(**SHAPES[shape])
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def initial_weights(args) -> Path:
    """Written once, loaded by every side (kubetrain reads it as model.name)."""
    out = args.work / f"init-{args.shape}"
    if not (out / "config.json").exists():
        from transformers import AutoTokenizer

        initial_model(args.shape, args.seed).save_pretrained(out)
        AutoTokenizer.from_pretrained(corpus(args)["tok"]).save_pretrained(out)
    return out


def result(args, side: str, *, model, tokens: float, seconds: float, peak, extra: dict) -> dict:
    from kubetrain_trainer.step_log import model_flops_per_token, peak_flops

    tok_s = tokens / seconds
    peak_flop = peak_flops(device())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(corpus(args)["tok"])
    docs = encode(tokenizer, read_rows(corpus(args)["eval"]), args.sft, args.max_length)
    return {"side": side, "ok": True, "real_tokens_per_s": tok_s, "timed_steps": args.steps, "timed_seconds": seconds,
            "mfu": model_flops_per_token(model) * tok_s / peak_flop[1] if peak_flop else None, "peak_gib": peak,
            "eval_loss": eval_loss(model, docs), **extra}


# --- Hugging Face Trainer ------------------------------------------------------------------------

def run_hf(args, side: str) -> dict:
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithFlattening,
                              Trainer, TrainerCallback, TrainingArguments)

    on_gpu = device().type == "cuda"
    tokenizer = AutoTokenizer.from_pretrained(corpus(args)["tok"])
    docs = encode(tokenizer, read_rows(corpus(args)["train"]), args.sft, args.max_length)
    flatten = "flatten" in side
    attention = "flash_attention_2" if side.endswith("-fa2") else "sdpa"
    for needed, wanted in (("flash_attn", attention == "flash_attention_2"), ("liger_kernel", "liger" in side)):
        if wanted:
            importlib.import_module(needed)  # not installed: ImportError, and the side is reported as not run
    if side.endswith("-no-cudnn"):
        torch.backends.cuda.enable_cudnn_sdp(False)
    model = AutoModelForCausalLM.from_pretrained(initial_weights(args), dtype=torch.float32, attn_implementation=attention)
    steps, warmup = args.warmup + args.steps, args.warmup
    clock: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step in (warmup, steps):
                sync(device())
                clock[state.global_step] = time.perf_counter()

    class CountingTrainer(Trainer):
        """Adds up each timed step's real tokens on the device (no host sync)."""

        real_tokens = torch.zeros((), dtype=torch.long, device=device())

        def training_step(self, model, inputs, *rest, **kw):
            if self.state.global_step >= warmup:
                mask = inputs.get("attention_mask")
                self.real_tokens += mask.sum().to(device()) if mask is not None else inputs["input_ids"].numel()
            return super().training_step(model, inputs, *rest, **kw)

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    options = dict(output_dir=str(args.work / side), per_device_train_batch_size=args.batch, max_steps=steps,
                   learning_rate=LEARNING_RATE, warmup_steps=warmup, lr_scheduler_type="linear", weight_decay=0.0,
                   max_grad_norm=1.0, bf16=on_gpu, logging_steps=steps, save_strategy="no", report_to=[],
                   disable_tqdm=True, seed=args.seed, optim="adamw_torch_fused" if on_gpu else "adamw_torch",
                   use_cpu=not on_gpu, torch_compile=side.endswith("-compiled"), use_liger_kernel="liger" in side,
                   dataloader_num_workers=0 if args.tiny else 2, remove_unused_columns=False)
    if "grouped" in side:
        options["train_sampling_strategy" if "train_sampling_strategy" in names else "group_by_length"] = (
            "group_by_length" if "train_sampling_strategy" in names else True)
    collator = (DataCollatorWithFlattening(return_position_ids=True) if flatten else
                DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100))
    train = docs if flatten else [{**d, "attention_mask": [1] * len(d["input_ids"])} for d in docs]
    trainer = CountingTrainer(model=model, args=TrainingArguments(**options), train_dataset=train, data_collator=collator,
                              callbacks=[Clock()])
    trainer.train()
    peak = peak_memory_gib(device())
    return result(args, side, model=model, tokens=float(trainer.real_tokens.item()), seconds=clock[steps] - clock[warmup],
                  peak=peak, extra={"attention": attention})


# --- kubetrain -----------------------------------------------------------------------------------

def run_kubetrain(args, side: str) -> dict:
    from transformers import AutoModelForCausalLM

    from kubetrain.api import parse_training_job
    from kubetrain_trainer import loop
    from kubetrain_trainer.build import RunOptions, build_run

    files, steps = corpus(args), args.warmup + args.steps
    init = initial_weights(args)
    doc = tiny.job_doc("lm", files["train"], None, files["tok"], str(args.work / side / "ckpt"), task="causal-lm")
    doc["spec"]["model"] = {"name": str(init), "task": "causal-lm", "tokenizer": str(files["tok"])}
    doc["spec"]["data"].update(maxLength=args.max_length, maxTokensPerBatch=args.batch * args.max_length, packing=True,
                               style="prompt-completion" if args.sft else "text")
    doc["spec"]["training"].update(maxSteps=steps, batchSize=args.batch, learningRate=LEARNING_RATE, warmupSteps=args.warmup,
                                   schedule="linear", weightDecay=0.0, maxGradNorm=1.0, seed=args.seed,
                                   precision="bf16" if device().type == "cuda" else "fp32", logEverySteps=args.warmup,
                                   compile=KUBETRAIN_COMPILE[side])
    doc["spec"]["training"].pop("epochs", None)
    doc["spec"]["checkpoint"].update(everySteps=10**6, keep=1)
    doc["spec"].pop("metrics", None)
    shutil.rmtree(args.work / side, ignore_errors=True)
    times = StepLog()
    logging.getLogger("kubetrain").addHandler(times)
    logging.getLogger("kubetrain").setLevel(logging.INFO)
    started = time.perf_counter()
    run = build_run(parse_training_job(doc), RunOptions(work_dir=args.work / side / "w",
                                                        checkpoint_prefix_uri=str(args.work / side / "ckpt"), metrics_port=None))
    assert loop.train(run) == 0
    peak = peak_memory_gib(device())
    at = {step: t for t, step, _, _ in times.windows}
    tokens, since = 0.0, at[args.warmup]
    for t, step, _, rate in times.windows:  # the trainer's own real-token rate over each timed window
        if step > args.warmup:
            tokens, since = tokens + rate * (t - since), t
    final = max((args.work / side / "ckpt").rglob("model.pt"), key=lambda p: p.parent.name)
    model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32, attn_implementation="sdpa").to(device())
    model.load_state_dict(torch.load(final, map_location=device(), weights_only=True))
    return result(args, side, model=model, tokens=tokens, seconds=at[steps] - at[args.warmup], peak=peak,
                  extra={"warmup_done_after_s": at[args.warmup] - started})


# --- the run -------------------------------------------------------------------------------------

def one(args) -> dict:
    if device().type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        run = run_kubetrain if args.side.startswith("kubetrain") else run_hf
        if not args.sync_sites:
            return run(args, args.side)
        with SyncSites() as syncs:
            row = run(args, args.side)
        return {**row, "sync_sites": syncs.most_common()}
    except ImportError as err:
        return {"side": args.side, "ok": False, "error": f"not run: {err}"}
    except torch.OutOfMemoryError as err:
        return {"side": args.side, "ok": False, "error": f"out of memory: {str(err).splitlines()[0]}"}


def goals(rows: list[dict], shape: str) -> dict:
    ok = {r["side"]: r for r in rows if r.get("ok")}
    ours = max((r for s, r in ok.items() if s.startswith("kubetrain")), key=lambda r: r["real_tokens_per_s"], default=None)
    best = max((r for s, r in ok.items() if s.startswith("hf-")), key=lambda r: r["real_tokens_per_s"], default=None)
    if not ours or not best:
        return {}
    want = {"1b": 1.8, "135m": 2.5}.get(shape)
    out = {"kubetrain_side": ours["side"], "hf_best_side": best["side"],
           "x_hf_best": ours["real_tokens_per_s"] / best["real_tokens_per_s"], "x_hf_best_goal": want,
           "memory_vs_hf_best": (ours["peak_gib"] / best["peak_gib"]) if ours["peak_gib"] and best["peak_gib"] else None,
           "eval_loss_vs_hf_best": ours["eval_loss"] / best["eval_loss"] - 1}
    if "hf-default" in ok:
        out["x_hf_default"] = ours["real_tokens_per_s"] / ok["hf-default"]["real_tokens_per_s"]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="135m")
    p.add_argument("--side", choices=SIDES, help="one side, in this process (printed as RESULT json)")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated; each in its own process")
    p.add_argument("--sft", action="store_true", help="prompt + completion, loss on the completion only")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-rows", type=int, default=256)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--side-timeout", type=float, default=900, help="seconds a side may take, compile included")
    p.add_argument("--tiny", action="store_true", help="tiny Llama on the CPU, a few steps (the test suite runs this)")
    p.add_argument("--sync-sites", action="store_true", help="count where the host waits for the GPU (CUDA sync debug "
                   "mode), by call site, into each row: a profile, not a timed run")
    p.add_argument("--work", type=Path, default=Path("/tmp/lm-compare"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.tiny:
        args.shape, args.batch, args.max_length, args.steps, args.warmup, args.eval_rows = "tiny", 4, 128, 4, 2, 16
    args.rows = (args.warmup + args.steps) * args.batch + 64
    if args.steps % args.warmup:
        p.error("--steps must be a multiple of --warmup (kubetrain logs, and so syncs, every --warmup steps)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.side:
        row = one(args)
        print("RESULT " + json.dumps(row), flush=True)
        return row
    corpus(args)
    initial_weights(args)
    rows = []
    for side in args.sides.split(","):
        cmd = [sys.executable, __file__, "--side", side, *(a for a in argv_of(args))]
        started = time.time()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.side_timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            found = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            row = found[0] if found else {"side": side, "ok": False, "error": (proc.stderr or proc.stdout)[-1500:]}
        except subprocess.TimeoutExpired:
            row = {"side": side, "ok": False, "error": f"did not finish within {args.side_timeout:.0f} s"}
        row["wall_s"] = round(time.time() - started, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    report = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "transformers": __import__("transformers").__version__, "shape": args.shape,
              "sft": args.sft, "batch": args.batch, "max_length": args.max_length, "steps": args.steps,
              "warmup": args.warmup, "rows": rows, "goals": goals(rows, args.shape)}
    print(json.dumps(report["goals"]), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def argv_of(args) -> list[str]:
    """The shared settings, for a side's own process."""
    out = ["--shape", args.shape, "--batch", str(args.batch), "--max-length", str(args.max_length), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--eval-rows", str(args.eval_rows), "--seed", str(args.seed), "--work", str(args.work)]
    return out + (["--sft"] if args.sft else []) + (["--tiny"] if args.tiny else []) + (["--sync-sites"] if args.sync_sites else [])


if __name__ == "__main__":
    main()
