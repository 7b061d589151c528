"""The training loop of one torchrun worker, top to bottom.

setup (data, model, optimizer, restore) -> for each step: forward/backward over this rank's
micro-batches, clip, step -> log / eval / checkpoint / stop -> final checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from kubetrain.api import EXIT_PREEMPTED, TrainingJob
from kubetrain.report import TrainerReport, write_report

from . import data as D
from .batching import DeviceBatcher
from .checkpoint import Checkpointer, TrainState, reserve_pinned_memory
from .checkpoint_store import CheckpointStore
from .compile import compile_for_training, shapes_of, unwrapped, wants_step_graphs
from .distributed import Runtime, configure_determinism, init_distributed, seed_everything
from .evaluate import evaluate
from .graphs import StepGraphs, one_batch_per_shape, one_sample_per_shape
from .losses import summed_loss
from .metrics import TrainerMetrics
from .model import build_model, load_tokenizer
from .optim import build_optimizer, build_scheduler
from .packing import PackedBatcher, PackedModel, position_offset
from .preemption import StopSignal, write_exit_marker
from .progress import EarlyStopping, ProgressLog
from .storage import open_storage

log = logging.getLogger("kubetrain.loop")


@dataclass(frozen=True)
class RunOptions:
    """Where this process puts things; the TrainingJob says what to train."""

    work_dir: Path
    checkpoint_prefix_uri: str  # <checkpoint.uri>/<namespace>/<job>
    metrics_port: int | None
    metrics_addr: str = "0.0.0.0"


AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(precision: str, device: torch.device):
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def report_outcome(rt: Runtime, checkpointer: Checkpointer, outcome: str, step: int) -> None:
    """Rank 0 leaves the final step and newest checkpoint in the pod's termination message."""
    if rt.is_main:
        ckpt = checkpointer.latest
        write_report(TrainerReport(outcome, step, ckpt.step if ckpt else None, ckpt.uri if ckpt else None,
                                   ckpt.created if ckpt else None))


def train(job: TrainingJob, opts: RunOptions) -> int:
    spec, t = job.spec, job.spec.training
    task = spec.model.task
    rt = init_distributed()
    configure_determinism(t.deterministic)
    s3 = {"endpoint": spec.checkpoint.endpoint, "region": spec.checkpoint.region}
    cache_dir = opts.work_dir / "cache"

    # --- data: every rank reads and tokenizes the same rows; the plan decides who trains on what
    tokenizer = load_tokenizer(spec.model, cache_dir, **s3)
    train_rows = D.read_rows(spec.data.train, spec.data.format, **s3)
    label_ids = D.label_vocabulary(train_rows, spec.data.label_field, spec.model.num_labels, spec.data.train) if task == D.CLASSIFICATION else None
    train_set = D.encode(train_rows, tokenizer, spec.data, task, spec.data.train, label_ids)
    eval_set = None
    if spec.data.eval:
        eval_set = D.encode(D.read_rows(spec.data.eval, spec.data.format, **s3), tokenizer, spec.data, task, spec.data.eval, label_ids)
    schedule = D.TrainSchedule(train_set, spec.data, task, t.seed, rt.world_size, t.gradient_accumulation)
    total_steps = schedule.total_steps(t.epochs, t.max_steps)

    # --- model and optimizer: same init on every rank, then per-rank dropout streams
    seed_everything(t.seed)
    model = build_model(spec.model, tokenizer, cache_dir, **s3).to(rt.device)
    optimizer = build_optimizer(model, t, rt.device)
    scheduler = build_scheduler(optimizer, t, total_steps)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=t.precision == "fp16")
    autocast = autocast_for(t.precision, rt.device)
    seed_everything(t.seed + rt.rank)

    metrics = TrainerMetrics() if rt.is_main else None
    storage, prefix = open_storage(opts.checkpoint_prefix_uri, **s3)
    store = CheckpointStore(storage, prefix, keep=spec.checkpoint.keep, attempts=spec.checkpoint.upload_attempts,
                            on_retry=metrics.checkpoint_retries.inc if metrics else None)
    checkpointer = Checkpointer(store, opts.work_dir, rt, metrics, lora=spec.model.lora is not None)
    if rt.is_main:  # only rank 0 snapshots; pay for fresh pinned memory now, not at the first checkpoint
        reserve_pinned_memory(model, lora=spec.model.lora is not None)
    restored = checkpointer.restore(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    state = restored.state if restored else TrainState()
    if restored:
        log.info("resumed from %s at step %d (epoch %d, micro-batch %d)", restored.info.uri, state.step, state.epoch, state.cursor)

    # training runs through `ddp` (packed wrapper, DDP, compile as configured); `model` is what is saved and evaluated
    trained = PackedModel(model, task, max_segment=spec.data.max_length) if spec.data.packing else model
    if spec.data.packing and rt.device.type == "cuda" and t.precision == "fp32":
        log.warning("packing with precision fp32 attends through a dense block mask (memory grows with the row length "
                    "squared); flash attention needs bf16 or fp16")
    ddp = DistributedDataParallel(trained, device_ids=[rt.device.index] if rt.device.type == "cuda" else None) if rt.world_size > 1 else trained
    ddp = compile_for_training(ddp, t.compile, spec.data, world_size=rt.world_size, grad_accum=t.gradient_accumulation,
                               device=rt.device, precision=t.precision)
    if spec.data.packing:
        batcher = PackedBatcher(train_set, tokenizer.pad_token_id, rt.device, task, position_offset(model), shapes_of(ddp))
    else:
        batcher = DeviceBatcher(train_set, tokenizer.pad_token_id, rt.device, shapes_of(ddp))
    graphs = None
    if wants_step_graphs(ddp):  # capture every batch shape now, not as stalls mid-training
        graphs = StepGraphs(ddp, optimizer, task=task, autocast_dtype=AUTOCAST_DTYPES[t.precision],
                            max_grad_norm=t.max_grad_norm, device=rt.device)
        graphs.prepare(batcher, one_batch_per_shape(batcher.shape, schedule.plan(state.epoch)) if spec.data.packing
                       else one_sample_per_shape(batcher, shapes_of(ddp).width))
    stop = StopSignal().install()
    early = EarlyStopping(t.early_stopping, state)
    progress = ProgressLog(rt, metrics, total_steps, state, model=model)
    if metrics:
        metrics.resumed_from_step.set(state.step)
        metrics.world_size.set(rt.world_size)
        metrics.total_steps.set(total_steps)
        if opts.metrics_port:
            try:
                metrics.serve(opts.metrics_port, opts.metrics_addr)
            except OSError as err:  # e.g. two local jobs on one port: train anyway, without /metrics
                log.warning("cannot serve /metrics on %s:%d (%s): metrics disabled", opts.metrics_addr, opts.metrics_port, err)
    eval_batches = D.plan_eval(eval_set.lengths, spec.data.max_tokens_per_batch, spec.data.max_samples_per_batch)[rt.rank :: rt.world_size] if eval_set else []

    def run_eval() -> dict[str, float]:
        return evaluate(model, eval_set, eval_batches, task=task, num_labels=spec.model.num_labels, device=rt.device,
                        autocast=autocast, pad_id=tokenizer.pad_token_id)

    def save(reason: str, wait: bool) -> None:
        checkpointer.save(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, state=state, reason=reason, wait=wait)

    log_if_main(rt, "training %s: %d steps, world size %d, %d train samples, precision %s", job.metadata.name,
                total_steps, rt.world_size, len(train_set), t.precision)
    model.train()
    while state.step < total_steps and not early.should_stop:  # a rerun of an early-stopped job trains no more
        if schedule.steps_in_epoch(state.epoch, state.cursor) == 0:
            state.epoch, state.cursor = state.epoch + 1, 0
            continue
        batches = schedule.step(state.epoch, state.cursor, rt.rank)
        started = time.perf_counter()
        loss_sum, grad_norm = train_step(ddp, optimizer, scaler, batcher, batches, task=task, rt=rt, autocast=autocast,
                                         max_grad_norm=t.max_grad_norm, graphs=graphs)
        scheduler.step()
        state.step += 1
        state.cursor += schedule.micro_per_step
        state.samples_seen += batches.global_samples
        state.tokens_seen += batches.global_tokens
        epoch_done = schedule.steps_in_epoch(state.epoch, state.cursor) == 0
        if epoch_done:
            state.epoch, state.cursor = state.epoch + 1, 0
        state.productive_seconds += time.perf_counter() - started
        progress.record(batches, loss_sum, grad_norm, scheduler.get_last_lr()[0])

        last = state.step == total_steps
        if state.step % t.log_every_steps == 0 or last:
            progress.flush(epoch=state.epoch + (0 if epoch_done else state.cursor / max(1, len(schedule.plan(state.epoch)))))
        eval_due = t.eval_every_steps and state.step % t.eval_every_steps == 0
        if eval_set and (eval_due or (t.eval_every_steps is None and epoch_done) or last):
            state.last_eval = run_eval()
            progress.report_eval(state.last_eval)
            early.update(state.last_eval)
        if state.step % spec.checkpoint.every_steps == 0 and not last:
            save("periodic", wait=False)
        if stop.agreed(rt.device):
            save("preemption", wait=True)
            write_exit_marker(rt.local_rank, state.step)
            report_outcome(rt, checkpointer, "preempted", state.step)
            log_if_main(rt, "preempted: emergency checkpoint at step %d saved; exiting %d", state.step, EXIT_PREEMPTED)
            return EXIT_PREEMPTED

    if early.should_stop:
        log_if_main(rt, "early stopping at step %d: %s did not improve for %d evaluations", state.step,
                    t.early_stopping.metric, early.spec.patience)
    save("final", wait=True)
    log_if_main(rt, "finished at step %d; eval %s", state.step, state.last_eval or "-")
    report_outcome(rt, checkpointer, "finished", state.step)
    if metrics and opts.metrics_port and spec.metrics.linger_seconds:
        time.sleep(spec.metrics.linger_seconds)  # let Prometheus scrape the final values
    return 0


def train_step(ddp, optimizer, scaler, to_device, batches: D.StepBatches, *, task: str, rt: Runtime,
               autocast, max_grad_norm: float | None, graphs: StepGraphs | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches; returns (local loss sum, grad norm) as tensors.

    Each micro-batch's summed loss is scaled by world_size / (global targets of the step), so after
    DDP's gradient averaging the update is the exact per-sample (or per-token) mean over the whole
    step, however unevenly the token budget split the samples. `to_device` turns a micro-batch's sample
    indices into the model's inputs (padded or packed).
    """
    scale = rt.world_size / batches.global_targets
    if graphs is not None and len(batches.micro_batches) == 1:
        return graphs.step(to_device(batches.micro_batches[0]), scale)
    loss_total = torch.zeros((), device=rt.device)
    is_ddp = isinstance(unwrapped(ddp), DistributedDataParallel)
    for i, indices in enumerate(batches.micro_batches):
        batch = to_device(indices)
        labels = batch.pop("labels", None)
        sync = i == len(batches.micro_batches) - 1 or not is_ddp
        with contextlib.nullcontext() if sync else unwrapped(ddp).no_sync():
            with autocast():
                logits = ddp(**batch).logits
            loss, _ = summed_loss(logits, batch, labels, task)
            scaler.scale(loss * scale).backward()
        loss_total += loss.detach()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_total, grad_norm


def log_if_main(rt: Runtime, msg: str, *args) -> None:
    if rt.is_main:
        log.info(msg, *args)

