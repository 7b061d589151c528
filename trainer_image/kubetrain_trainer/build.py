"""The composition root: every component of a run is built here, in one place, into a typed `Run`.

`build_run` reads and tokenizes the data, builds the model, optimizer, scheduler, scaler, metrics
and checkpointer, and restores the newest checkpoint into them. `prepare` then wraps the model for
training (packing, DDP, torch.compile) and returns the module to train with, its batcher and its
step graphs. `loop.train(run)` only runs the loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from kubetrain.api import TrainingJob

from . import data as D
from .batching import DeviceBatcher
from .checkpoint import Checkpointer
from .checkpoint_state import CheckpointContent, Group, ModelWeights, TrainState
from .checkpoint_store import CheckpointStore
from .compile import compile_for_training
from .distributed import Runtime, configure_determinism, init_distributed, seed_everything
from .generation_eval import Prompts, prompts_for
from .host_copies import reserve_pinned_memory
from .graphs import StepGraphs, one_batch_per_shape, one_sample_per_shape
from .metrics import TrainerMetrics
from .model import build_model, enable_activation_checkpointing, load_tokenizer, without_training_cache
from .optim import build_optimizer, build_scheduler
from .packing import PackedBatcher, PackedModel, position_offset
from .resume import Start, accumulation_for, apply_learning_rate, model_identity, run_settings
from .sharded_checkpoint import Shards
from .sharding import ShardedState, local_bytes, materialize, shard_model
from .storage import open_storage
from .tasks import Task, task_for

log = logging.getLogger("kubetrain.build")

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class RunOptions:
    """Where this process puts things; the TrainingJob says what to train."""

    work_dir: Path
    checkpoint_prefix_uri: str  # <checkpoint.uri>/<namespace>/<job>
    metrics_port: int | None
    metrics_addr: str = "0.0.0.0"
    job_uid: str = ""  # the TrainingJob object's uid (pods); empty locally: a fresh identity per run


@dataclass
class Run:
    """Everything one worker trains with. `model` is the raw model: saved, evaluated, and wrapped by `prepare`."""

    job: TrainingJob
    opts: RunOptions
    rt: Runtime
    task: Task
    tokenizer: object
    labels: dict[str, int] | None  # raw label -> class id (classification), named in an exported model's config
    train_set: D.Encoded
    eval_set: D.Encoded | None
    eval_batches: list[list[int]]  # this rank's share; under fsdp padded with [] (a forward not counted)
    schedule: D.TrainSchedule
    total_steps: int
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    autocast: Callable[[], contextlib.AbstractContextManager]
    metrics: TrainerMetrics | None  # rank 0 only
    checkpointer: Checkpointer
    state: TrainState
    start: Start  # the checkpoint resumed (or scratch), why, and the settings changed since
    answers: Prompts | None = None  # training.generationEval: the eval prompts this rank answers


@dataclass
class Prepared:
    """The module `train_step` runs (packed, DDP, compiled as configured), how batches reach it, and its graphs."""

    module: torch.nn.Module
    batcher: DeviceBatcher | PackedBatcher
    graphs: StepGraphs | None
    loss: Callable | None = None  # (module, batch, labels) -> (loss sum, count) where the forward computes the loss


def autocast_for(precision: str, device: torch.device):
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def build_run(job: TrainingJob, opts: RunOptions) -> Run:
    spec, t = job.spec, job.spec.training
    task = task_for(spec.model.task)
    rt = init_distributed()
    configure_determinism(t.deterministic)
    s3 = {"endpoint": spec.checkpoint.endpoint, "region": spec.checkpoint.region}
    cache_dir = opts.work_dir / "cache"

    # data: every rank reads and tokenizes the same rows; the plan decides who trains on what
    tokenizer = load_tokenizer(spec.model, cache_dir, **s3)
    train_rows = D.read_rows(spec.data.train, spec.data.format, **s3)
    labels = task.label_vocabulary(train_rows, spec.data, spec.model, spec.data.train)
    train_set = task.encode(train_rows, tokenizer, spec.data, spec.data.train, labels)
    eval_set = None
    if spec.data.eval:
        eval_set = task.encode(D.read_rows(spec.data.eval, spec.data.format, **s3), tokenizer, spec.data, spec.data.eval, labels)
    eval_plan = D.plan_eval(eval_set.lengths, spec.data.max_tokens_per_batch, spec.data.max_samples_per_batch) if eval_set else []
    eval_batches = eval_plan[rt.rank :: rt.world_size]
    if t.strategy == "fsdp" and eval_plan:  # every rank runs as many forwards (each gathers the shards): empty = filler
        eval_batches += [[]] * (-(-len(eval_plan) // rt.world_size) - len(eval_batches))
    answers = prompts_for(eval_set, t.generation_eval, tokenizer, rt) if t.generation_eval and eval_set else None

    # model and optimizer: same init on every rank (fsdp: rank 0's, sharded out), then per-rank dropout streams
    seed_everything(t.seed)
    model = build_sharded_model(job, rt, tokenizer, cache_dir, **s3) if t.strategy == "fsdp" else build_model(
        spec.model, task, tokenizer, cache_dir, precision=t.precision, device=rt.device, **s3)
    if t.activation_checkpointing and t.strategy != "fsdp":  # (fsdp: enabled before sharding)
        log_blocks(enable_activation_checkpointing(model))
    optimizer = build_optimizer(model, t, rt.device)
    seed_everything(t.seed + rt.rank)

    # checkpoints: where they go, and the newest one this job may resume
    lora = spec.model.lora is not None
    metrics = TrainerMetrics() if rt.is_main else None
    storage, prefix = open_storage(opts.checkpoint_prefix_uri, **s3)
    store = CheckpointStore(storage, prefix, keep=spec.checkpoint.keep, attempts=spec.checkpoint.upload_attempts,
                            on_retry=metrics.checkpoint_retries.inc if metrics else None)
    state, content = TrainState(), CheckpointContent()
    shards = Shards(ShardedState(model, optimizer, lora), rt, store) if t.strategy == "fsdp" else None
    record = {"identity": model_identity(spec), "job_uid": opts.job_uid, "labels": labels}
    checkpointer = Checkpointer(store, opts.work_dir, rt, metrics, content, state, record, shards)
    chosen = checkpointer.choose()

    # the step: world size x accumulation micro-batches of the plan, kept as the checkpoint had it if only
    # the world size changed; the learning-rate schedule follows from the steps
    accumulation, why = accumulation_for(chosen.info.meta if chosen.info else None, t.gradient_accumulation, rt.world_size)
    if why:
        log.warning("%s", why)
    record["settings"] = run_settings(spec, rt.world_size, accumulation)
    schedule = D.TrainSchedule(train_set, spec.data, task, t.seed, rt.world_size, accumulation, t.batch_size)
    total_steps = schedule.total_steps(t.epochs, t.max_steps)
    scheduler = build_scheduler(optimizer, t, total_steps)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=t.precision == "fp16")

    # what a checkpoint holds, and the chosen one restored into it all
    if shards is None:  # else the weights and optimizer state are sharded (Shards)
        content.register("model.pt", ModelWeights(model, lora))
        content.register("optimizer.pt", optimizer)
    content.register("training.pt", Group(scheduler=scheduler, scaler=scaler))  # RNG: seeded per step
    content.register("state.json", state)
    if rt.is_main or shards is not None:  # the ranks that stage: pay for fresh pinned memory now, not at the first checkpoint
        reserve_pinned_memory(model, lora=lora)
    start = checkpointer.load(chosen)
    if spec.output is not None and spec.output.from_ == "best" and state.best_step is not None:
        store.kept = {state.best_step}  # the best evaluation's checkpoint outlives retention across restarts
    if start.checkpoint:
        apply_learning_rate(optimizer, scheduler, spec)  # the job's spec applies from here on (resume.py)
        log.info("resumed from %s at step %d (epoch %d, micro-batch %d): %s", start.checkpoint, state.step, state.epoch,
                 state.cursor, start.why)
        if start.changed:
            log.warning("settings changed since that checkpoint; this job's spec applies from step %d: %s", state.step,
                        "; ".join(start.changed))
    else:
        log.info("training from scratch: %s", start.why)

    return Run(job, opts, rt, task, tokenizer, labels, train_set, eval_set, eval_batches, schedule, total_steps, model, optimizer,
               scheduler, scaler, autocast_for(t.precision, rt.device), metrics, checkpointer, state, start, answers)


def build_sharded_model(job: TrainingJob, rt: Runtime, tokenizer, cache_dir: Path, **s3) -> torch.nn.Module:
    """FSDP2: rank 0 builds the real weights on the CPU; every rank shards a meta-device copy and receives its
    shards from rank 0 (sharding.py)."""
    spec, t = job.spec, job.spec.training
    task = task_for(spec.model.task)
    full = (build_model(spec.model, task, tokenizer, cache_dir, precision=t.precision, device="cpu", **s3).state_dict()
            if rt.is_main else None)
    model = build_model(spec.model, task, tokenizer, cache_dir, precision=t.precision, weights=False, **s3)
    if t.activation_checkpointing:
        log_blocks(enable_activation_checkpointing(model))
    shard_model(model, rt, t.fsdp, t.precision)
    materialize(model, rt.device, full, t.fsdp.cpu_offload)
    del full
    log.info("fsdp: %.1f MB of parameters on this rank", local_bytes(model) / 1e6)
    return model


def log_blocks(count: int) -> None:
    log.info("activation checkpointing: %d transformer blocks recompute their activations in the backward", count)


def prepare(run: Run) -> Prepared:
    """Wrap the model for training: packed rows, DDP, torch.compile; then the batcher and the step graphs."""
    spec, t, rt = run.job.spec, run.job.spec.training, run.rt
    without_training_cache(run.model)
    module, loss = fused_lm(run)
    if spec.data.packing:
        module = PackedModel(module, run.task, max_segment=spec.data.max_length)
    if spec.data.packing and rt.device.type == "cuda" and t.precision == "fp32":
        log.warning("packing with precision fp32 attends through a dense block mask (memory grows with the row length "
                    "squared); flash attention needs bf16 or fp16")
    if rt.world_size > 1 and t.strategy == "ddp":
        module = DistributedDataParallel(module, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    compiled = compile_for_training(module, t.compile, spec.data, world_size=rt.world_size, grad_accum=run.schedule.grad_accum,
                                    device=rt.device, precision=t.precision, strategy=t.strategy,
                                    loss_in_forward=loss is not None)
    pad_id = run.tokenizer.pad_token_id
    if spec.data.packing:
        batcher = PackedBatcher(run.train_set, pad_id, rt.device, run.task, position_offset(run.model), compiled.shapes)
    else:
        batcher = DeviceBatcher(run.train_set, pad_id, rt.device, compiled.shapes)
    graphs = None
    if compiled.step_graphs:  # capture every batch shape now, not as stalls mid-training
        graphs = StepGraphs(compiled.module, run.optimizer, task=run.task, autocast_dtype=AUTOCAST_DTYPES[t.precision],
                            max_grad_norm=t.max_grad_norm, device=rt.device, loss_fn=loss)
        graphs.prepare(batcher, one_batch_per_shape(batcher.shape, run.schedule.plan(run.state.epoch)) if spec.data.packing
                       else one_sample_per_shape(batcher, compiled.shapes.width))
    return Prepared(compiled.module, batcher, graphs, loss)


def fused_lm(run: Run) -> tuple[torch.nn.Module, Callable | None]:
    """training.fusedLoss: a model whose training forward computes the loss (the task's, e.g. lm_loss), and the
    loss function train_step then uses; else the model itself and None (logits, then Task.summed_loss)."""
    t = run.job.spec.training
    if t.fused_loss == "off":
        return run.model, None
    fused = run.task.loss_in_forward(run.model, compiled=t.compile != "off")
    return fused if fused else (run.model, None)
