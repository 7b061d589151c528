"""kubetrain's trainer against Hugging Face Trainer: same model, data, batch and steps, one process, one GPU.

The corpus has skewed lengths: word counts drawn lognormal (median ~40 tokens with [CLS]/[SEP]),
capped by `--max-length` (128 or 512). A WordPiece tokenizer trained on it maps each word to one
token. Labels are learnable from marker words, so eval loss means something. Sides, in this order:
- `hf-default`: Trainer, bf16, every sample padded to max_length (the tokenizer's padding="max_length");
- `hf-best`: Trainer, bf16, group_by_length, DataCollatorWithPadding, 2 loader workers, with and
  without torch_compile (both reported; the faster is "best");
- `kubetrain`: the real training loop (`kubetrain_trainer.loop.train` on a generated TrainingJob),
  with compile off and with `--kubetrain-compile` (default reduce-overhead);
- `kubetrain-packed`: the same with `spec.data.packing` (samples end to end, varlen flash attention),
  compiled as `--kubetrain-compile` (off with --tiny).
Fairness: every side starts from the same weights (same seed, same constructor), uses fused AdamW,
lr warmup then linear decay, clip 1.0, and takes `--warmup + --steps` optimizer steps of `--batch`
samples. kubetrain batches by token budget, so its job sets maxSamplesPerBatch = batch and
maxTokensPerBatch = batch x max_length: every micro-batch holds `batch` samples except the last of
each length-sorting window (so its mean is a hair under), and it reports its actual samples/s.
Timed: the `--steps` steps after `--warmup` (compilation, CUDA-graph capture), bracketed by device
syncs. Real tokens are non-pad tokens. MFU = 6N x real tokens/s / the GPU's bf16 peak (N and peak
from kubetrain_trainer.step_log). Eval loss: per-sample mean cross-entropy on the same held-out set,
computed by the same function for every side (kubetrain's from its final checkpoint).

    python bench/hf_compare.py [--batch 32] [--max-length 128] [--steps 300] [--warmup 100] [--out r.json]
    python bench/hf_compare.py --tiny      # CPU, tiny RoBERTa, seconds (the test suite runs this)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
from kubetrain_testkit import tiny  # tokenizer training, job documents
from kubetrain_testkit.benchkit import StepLog, peak_memory_gib, sync
from kubetrain_testkit.synthetic import make_rows, words, write_jsonl  # the skewed-length corpus

ROBERTA_BASE = {"model_type": "roberta", "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12,
                "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 514, "type_vocab_size": 1}
TINY_ROBERTA = {"model_type": "roberta", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                "intermediate_size": 64, "max_position_embeddings": 514, "type_vocab_size": 1}
LEARNING_RATE = 5e-5
log = logging.getLogger("hf_compare")


# --- the corpus ---------------------------------------------------------------------------------

# --- shared measurement -------------------------------------------------------------------------

def fresh_side(b: Bench, side: str) -> None:
    """Before a side: an empty work dir (no resume from an earlier run), free memory, no compiled
    graphs, a fresh peak-memory counter."""
    shutil.rmtree(b.work / side, ignore_errors=True)
    gc.collect()
    torch._dynamo.reset()
    if b.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(b.device)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, enc: dict, device: torch.device, pad_id: int, batch: int = 256) -> float:
    """Per-sample mean cross-entropy over the eval set (length-sorted batches, bf16 on GPU)."""
    model.eval()
    order = np.argsort([len(ids) for ids in enc["input_ids"]])
    total = 0.0
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        width = max(len(enc["input_ids"][i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, : len(enc["input_ids"][i])] = torch.tensor(enc["input_ids"][i])
            mask[row, : len(enc["input_ids"][i])] = 1
        labels = torch.tensor([enc["labels"][i] for i in idx], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        total += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").item()
    model.train()
    return total / len(order)


@dataclasses.dataclass
class Bench:
    """What every side shares: data, tokenizer, model spec, sizes."""

    args: argparse.Namespace
    device: torch.device
    work: Path
    tokenizer: object
    train_rows: list[dict]
    eval_enc: dict
    model_config: dict

    @property
    def total_steps(self) -> int:
        return self.args.warmup + self.args.steps

    def build_model(self) -> torch.nn.Module:
        """The same initial weights for every side: kubetrain's own constructor under the job's seed."""
        from kubetrain.api import ModelSpec
        from kubetrain_trainer.distributed import seed_everything
        from kubetrain_trainer.model import build_model
        from kubetrain_trainer.tasks import task_for

        seed_everything(self.args.seed)
        spec = ModelSpec.model_validate({"config": self.model_config, "tokenizer": str(self.work / "tok"),
                                         "task": "sequence-classification", "numLabels": 2})
        return build_model(spec, task_for(spec.task), self.tokenizer, self.work / "cache")

    def result(self, side: str, *, tokens: float, samples: float, seconds: float, model, peak_gib, extra=None) -> dict:
        from kubetrain_trainer.step_log import model_flops_per_token, peak_flops

        tokens_s = tokens / seconds
        peak = peak_flops(self.device)
        row = {
            "side": side,
            "real_tokens_per_s": tokens_s,
            "samples_per_s": samples / seconds,
            "samples_per_step": samples / self.args.steps,
            "timed_steps": self.args.steps,
            "timed_seconds": seconds,
            "mfu_real_tokens": model_flops_per_token(model) * tokens_s / peak[1] if peak else None,
            "peak_memory_gib": peak_gib,
            "eval_loss": eval_loss(model, self.eval_enc, self.device, self.tokenizer.pad_token_id),
        }
        row.update(extra or {})
        log.info("%s", json.dumps(row))
        return row


# --- Hugging Face Trainer -----------------------------------------------------------------------

def run_hf(b: Bench, side: str, *, best: bool, compile: bool) -> dict:
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    fresh_side(b, side)
    texts = [r["text"] for r in b.train_rows]
    padding = "do_not_pad" if best else "max_length"
    enc = b.tokenizer(texts, truncation=True, max_length=b.args.max_length, padding=padding)
    rows = [{**{k: enc[k][i] for k in enc}, "labels": r["label"]} for i, r in enumerate(b.train_rows)]
    steps, warmup = b.total_steps, b.args.warmup
    clock: dict[str, float] = {}

    class Clock(TrainerCallback):
        """Device-synced wall time at the end of the warm-up and of the last timed step."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (warmup, steps):
                sync(b.device)
                clock[str(state.global_step)] = time.perf_counter()

    class CountingTrainer(Trainer):
        """Adds up each timed step's real tokens on the device (no host sync)."""

        real_tokens = torch.zeros((), dtype=torch.long, device=b.device)
        samples = 0

        def training_step(self, model, inputs, *rest, **kw):
            if self.state.global_step >= warmup:
                self.real_tokens += inputs["attention_mask"].sum().to(b.device)
                self.samples += int(inputs["input_ids"].shape[0])
            return super().training_step(model, inputs, *rest, **kw)

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    options = dict(output_dir=str(b.work / side), per_device_train_batch_size=b.args.batch, max_steps=steps,
                   learning_rate=LEARNING_RATE, warmup_steps=warmup, lr_scheduler_type="linear", weight_decay=0.0,
                   max_grad_norm=1.0, bf16=b.device.type == "cuda", logging_steps=steps, save_strategy="no",
                   report_to=[], disable_tqdm=True, seed=b.args.seed, optim="adamw_torch_fused" if b.device.type == "cuda" else "adamw_torch",
                   use_cpu=b.device.type != "cuda", torch_compile=compile)
    if best:
        options["dataloader_num_workers"] = 0 if b.args.tiny else 2
        if "train_sampling_strategy" in names:  # transformers >= 5.2x
            options["train_sampling_strategy"] = "group_by_length"
        else:
            options["group_by_length"] = True
    model = b.build_model()
    trainer = CountingTrainer(model=model, args=TrainingArguments(**options), train_dataset=rows,
                              data_collator=DataCollatorWithPadding(b.tokenizer) if best else default_data_collator,
                              callbacks=[Clock()])
    trainer.train()
    peak = peak_memory_gib(b.device)
    seconds = clock[str(steps)] - clock[str(warmup)]
    row = b.result(side, tokens=float(trainer.real_tokens.item()), samples=trainer.samples, seconds=seconds, model=model,
                   peak_gib=peak, extra={"torch_compile": compile})
    del trainer, model
    return row


# --- kubetrain -----------------------------------------------------------------------------------

def kubetrain_job(b: Bench, side: str, compile: str, train: Path, evals: Path) -> dict:
    a = b.args
    doc = tiny.job_doc(side, train, evals, b.work / "tok", str(b.work / side / "ckpt"))
    doc["spec"]["model"]["config"] = b.model_config
    doc["spec"]["data"].update(maxLength=a.max_length, maxTokensPerBatch=a.batch * a.max_length, maxSamplesPerBatch=a.batch,
                               packing=side.endswith("-packed"))
    doc["spec"]["training"].update(maxSteps=b.total_steps, learningRate=LEARNING_RATE, warmupSteps=a.warmup,
                                   schedule="linear", weightDecay=0.0, maxGradNorm=1.0, seed=a.seed,
                                   precision="bf16" if b.device.type == "cuda" else "fp32", logEverySteps=a.warmup,
                                   compile=compile)
    doc["spec"]["checkpoint"].update(everySteps=b.total_steps + 1, keep=1)
    return doc


@contextlib.contextmanager
def profiled_steps(b: Bench, side: str, count: int = 20):
    """With --profile DIR: torch.profiler over `count` timed steps of the trainer, tables written to DIR.

    Wraps `loop.train_step` (the trainer has no callbacks); the profiled steps are not timed apart from the rest,
    so a profiled run's throughput is a little low.
    """
    from kubetrain_trainer import loop

    if b.args.profile is None:
        yield
        return
    original, calls, inside, window = loop.train_step, [0], [0.0], [0.0]
    first = b.args.warmup + 20
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])

    def train_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == first:
            inside[0] = 0.0
            sync(b.device)
            prof.start()
            window[0] = time.perf_counter()
        began = time.perf_counter()
        out = original(*args, **kwargs)
        inside[0] += time.perf_counter() - began
        if calls[0] == first + count - 1:
            host = time.perf_counter()
            sync(b.device)
            prof.stop()
            end = time.perf_counter()
            (b.args.profile / f"{side}-timing.txt").parent.mkdir(parents=True, exist_ok=True)
            (b.args.profile / f"{side}-timing.txt").write_text(
                f"{count} steps: {1e3 * (end - window[0]) / count:.2f} ms/step wall (profiler on); host left "
                f"{1e3 * (host - window[0]) / count:.2f} ms/step; inside train_step "
                f"{1e3 * inside[0] / count:.2f} ms/step (counted from the start)\n")
            b.args.profile.mkdir(parents=True, exist_ok=True)
            for key in ("self_cpu_time_total", "self_cuda_time_total", "cpu_time_total"):
                table = prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=90)
                (b.args.profile / f"{side}-{key}.txt").write_text(f"{count} steps\n{table}")
        return out

    loop.train_step = train_step
    try:
        yield
    finally:
        loop.train_step = original


def run_kubetrain(b: Bench, side: str, compile: str, train: Path, evals: Path) -> dict:
    from kubetrain.api import TrainingJob
    from kubetrain_trainer.build import RunOptions, build_run
    from kubetrain_trainer.loop import train as train_loop

    fresh_side(b, side)
    job = TrainingJob.model_validate(kubetrain_job(b, side, compile, train, evals))
    steps = StepLog()
    trainer_log = logging.getLogger("kubetrain")
    trainer_log.addHandler(steps)
    trainer_log.setLevel(logging.INFO)
    try:
        with profiled_steps(b, side):
            code = train_loop(build_run(job, RunOptions(work_dir=b.work / side / "w",
                                                        checkpoint_prefix_uri=str(b.work / side / "ckpt" / "run"), metrics_port=None)))
    finally:
        trainer_log.removeHandler(steps)
    peak = peak_memory_gib(b.device)
    assert code == 0, f"kubetrain exited {code}"
    timed = [w for w in steps.windows if w[1] > b.args.warmup]
    start = next(w for w in steps.windows if w[1] == b.args.warmup)
    assert timed and timed[-1][1] == b.total_steps, steps.windows
    times = [start[0]] + [w[0] for w in timed]
    spans = np.diff(times)
    tokens = sum(w[3] * s for w, s in zip(timed, spans, strict=True))  # the trainer's own real-token rate per window
    samples = sum(w[2] * s for w, s in zip(timed, spans, strict=True))
    model = b.build_model().to(b.device)
    final = max((b.work / side / "ckpt").rglob("model.pt"), key=lambda p: p.parent.name)
    model.load_state_dict(torch.load(final, map_location=b.device, weights_only=True))
    row = b.result(side, tokens=tokens, samples=samples, seconds=times[-1] - times[0], model=model, peak_gib=peak,
                   extra={"compile": compile, "trainer_eval": steps.evals[-1] if steps.evals else None})
    del model
    return row


# --- the run ------------------------------------------------------------------------------------

def ratio_goal(value: float, goal: float) -> dict:
    return {"value": value, "goal": goal, "met": bool(value >= goal)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny RoBERTa on CPU, few steps (tests)")
    p.add_argument("--batch", type=int, default=32, help="global batch in samples, every side")
    p.add_argument("--max-length", type=int, default=128, help="length cap in tokens (128 or 512)")
    p.add_argument("--steps", type=int, default=300, help="timed optimizer steps after the warm-up")
    p.add_argument("--warmup", type=int, default=100, help="untimed steps first (compile, graph capture); lr warmup too")
    p.add_argument("--eval-rows", type=int, default=4000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--sides", default=None, help="comma-separated; default all (with --tiny: none compiled, "
                   "as Inductor on CPU takes minutes)")
    p.add_argument("--kubetrain-compile", default="reduce-overhead", choices=["default", "reduce-overhead"])
    p.add_argument("--work", type=Path, default=Path("/tmp/hf-compare"))
    p.add_argument("--out", type=Path, default=None, help="also write the JSON result here")
    p.add_argument("--profile", type=Path, default=None, help="write torch.profiler tables of 20 kubetrain steps here")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.steps, args.warmup, args.eval_rows = min(args.batch, 8), min(args.steps, 6), min(args.warmup, 3), 48
    if args.steps % args.warmup:
        p.error("--steps must be a multiple of --warmup (kubetrain logs, and so syncs, every --warmup steps)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    work = args.work / f"b{args.batch}-l{args.max_length}"
    vocab = words(300 if args.tiny else 4000)
    n_train = int(args.batch * (args.warmup + args.steps) * 1.1) + 64
    train_rows, eval_rows = make_rows(n_train, vocab, seed=1), make_rows(args.eval_rows, vocab, seed=2)
    train_file, eval_file = write_jsonl(train_rows, work / "train.jsonl"), write_jsonl(eval_rows, work / "eval.jsonl")
    tok_dir = tiny.train_tokenizer(work / "tok", train_file, vocab_size=len(vocab) + 400)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    eval_enc = tokenizer([r["text"] for r in eval_rows], truncation=True, max_length=args.max_length)
    eval_enc = {"input_ids": eval_enc["input_ids"], "labels": [r["label"] for r in eval_rows]}
    lengths = np.array([len(ids) for ids in tokenizer([r["text"] for r in train_rows], truncation=True, max_length=args.max_length)["input_ids"]])
    config = dict(TINY_ROBERTA if args.tiny else ROBERTA_BASE)
    b = Bench(args, device, work, tokenizer, train_rows, eval_enc, config)

    initial = eval_loss(b.build_model().to(device), eval_enc, device, tokenizer.pad_token_id)
    runs = {
        "hf-default": lambda: run_hf(b, "hf-default", best=False, compile=False),
        "hf-best": lambda: run_hf(b, "hf-best", best=True, compile=False),
        "hf-best-compiled": lambda: run_hf(b, "hf-best-compiled", best=True, compile=True),
        "kubetrain": lambda: run_kubetrain(b, "kubetrain", "off", train_file, eval_file),
        "kubetrain-compiled": lambda: run_kubetrain(b, "kubetrain-compiled", args.kubetrain_compile, train_file, eval_file),
        "kubetrain-packed": lambda: run_kubetrain(b, "kubetrain-packed", "off" if args.tiny else args.kubetrain_compile,
                                                  train_file, eval_file),
    }
    sides = args.sides or ("hf-default,hf-best,kubetrain,kubetrain-packed" if args.tiny else ",".join(runs))
    rows = {side: run_side(side, runs[side]) for side in sides.split(",")}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "model": "tiny-roberta" if args.tiny else "roberta-base (random init, vocab 50265)",
        "batch": args.batch, "max_length": args.max_length, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "train_rows": n_train,
        "lengths": {"median": float(np.median(lengths)), "mean": float(lengths.mean()), "p95": float(np.percentile(lengths, 95)),
                    "max": int(lengths.max()), "at_cap": float((lengths == args.max_length).mean())},
        "initial_eval_loss": initial,
        "sides": rows,
        "goals": goals(rows),
    }
    text = json.dumps(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return result


def run_side(side: str, run) -> dict:
    """One side's row, with its whole wall time (setup, compile, warm-up, eval); a failure is reported, not fatal."""
    started = time.perf_counter()
    try:
        row = run()
    except Exception as err:  # noqa: BLE001 -- the other sides' numbers are still worth having
        log.exception("side %s failed", side)
        row = {"side": side, "error": f"{type(err).__name__}: {err}"[:2000]}
    row["wall_seconds"] = time.perf_counter() - started
    return row


def goals(rows: dict) -> dict:
    """The issue's throughput goals, from whichever sides ran."""
    ok = {s: r for s, r in rows.items() if "error" not in r}
    ours = max((r for s, r in ok.items() if s.startswith("kubetrain")), key=lambda r: r["real_tokens_per_s"], default=None)
    best = max((r for s, r in ok.items() if s.startswith("hf-best")), key=lambda r: r["real_tokens_per_s"], default=None)
    out = {}
    if ours is None:
        return out
    out["kubetrain_side"] = ours["side"]
    if "hf-default" in ok:
        out["x_hf_default"] = ratio_goal(ours["real_tokens_per_s"] / ok["hf-default"]["real_tokens_per_s"], 5.0)
    if best:
        out["hf_best_side"] = best["side"]
        out["x_hf_best"] = ratio_goal(ours["real_tokens_per_s"] / best["real_tokens_per_s"], 1.5)
    if ours["mfu_real_tokens"] is not None:
        out["mfu_real_tokens"] = ratio_goal(ours["mfu_real_tokens"], 0.35)
    return out


if __name__ == "__main__":
    main()
