"""The training loop of one torchrun worker, top to bottom.

build_run (every component, restored) -> prepare (the module to train) -> for each step: forward and
backward over this rank's micro-batches, clip, step -> log / eval / checkpoint / stop -> final checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from kubetrain.api import EXIT_PREEMPTED
from kubetrain.contracts import CheckpointReason
from kubetrain.termination import TrainerReport, write_report

from .build import Run, prepare
from .clipping import clip_gradients, divided_in_update
from .compile import unwrapped
from .data import StepBatches
from .distributed import Runtime, seed_step
from .divergence import NonFiniteGuard, update_skipped_if_non_finite
from .evaluate import evaluate
from .generation_eval import generation_metrics
from .export import Exported
from .failures import Diverged, lost_a_peer
from .graphs import StepGraphs
from .exit_markers import write_exit_marker
from .preemption import StopSignal
from . import tracking
from .output import export_run
from .sharding import local_bytes
from .step_log import EarlyStopping, StepLog
from .step_loss import micro_batch_loss
from .tracking import Tracker
from .tasks import Task

log = logging.getLogger("kubetrain.loop")


def train(run: Run) -> int:
    tracker = start_tracking(run) if run.rt.is_main else None
    try:
        code = train_loop(run, tracker)
    except Diverged:
        run.checkpointer.settle_latest()  # the last good checkpoint lands, and every rank reports it
        leave_progress(run)
        end_tracking(tracker, "FAILED")
        raise
    except Exception as err:
        if lost_a_peer(err):
            rescue(run, err)
        leave_progress(run)
        end_tracking(tracker, "FAILED")
        raise
    if tracker:  # preempted: the run goes on in the next group (its id is in the checkpoint)
        tracker.close(timeout=10 if code == EXIT_PREEMPTED else 30)
    return code


def start_tracking(run: Run) -> Tracker | None:
    state, metrics = run.state, run.metrics
    return tracking.start_tracking(run.job, state.mlflow_run_id, on_error=metrics.tracking_errors.inc if metrics else None,
                                   on_run=lambda run_id: setattr(state, "mlflow_run_id", run_id))


def end_tracking(tracker: Tracker | None, status: str) -> None:
    if tracker:
        tracker.finish(status)
        tracker.close(timeout=10)


def leave_progress(run: Run) -> None:
    """A failing worker's step and newest complete checkpoint, for the launcher's failure report: status keeps
    its lastCheckpoint even when the job fails before the operator ever scraped it."""
    ckpt = run.checkpointer.latest
    write_exit_marker(run.rt.local_rank, "progress", step=run.state.step, checkpoint_step=ckpt.step if ckpt else None,
                      checkpoint_uri=ckpt.uri if ckpt else None, checkpoint_time=ckpt.created if ckpt else None,
                      start=run.start.to_json())


def rescue(run: Run, err: BaseException) -> None:
    """A peer died mid-step. The loop's only collectives run while the state is consistent (DDP's gradient
    all-reduce before the optimizer step; the log, stop and guard reductions after `advance`), so rank 0
    holds the complete state of step `state.step`: it saves it, and the restart loses no step."""
    if not run.rt.is_main:
        return
    step = run.state.step
    if run.checkpointer.shards is not None:
        log.warning("a peer is gone (%s): sharded state (fsdp) has no complete copy on one rank, so no rescue "
                    "checkpoint; a restart resumes from the newest complete checkpoint", str(err).splitlines()[0][:200])
        return
    log.warning("a peer is gone (%s): saving a rescue checkpoint of step %d", str(err).splitlines()[0][:200], step)
    try:
        info = run.checkpointer.rescue()
    except Exception as failure:  # noqa: BLE001 - the newest complete checkpoint stays the fallback
        log.error("rescue checkpoint of step %d failed (%s); a restart resumes from the newest complete one", step, failure)
        return
    log.warning("rescue checkpoint of step %d complete: %s", step, info.uri if info else "-")


def train_loop(run: Run, tracker: Tracker | None = None) -> int:
    spec, t, rt, state = run.job.spec, run.job.spec.training, run.rt, run.state
    prepared = prepare(run)
    stop = StopSignal().install()
    early = EarlyStopping(t.early_stopping, state)
    progress = StepLog(rt, run.metrics, run.total_steps, state, model=run.model)
    progress.tracker = tracker
    guard = NonFiniteGuard(t, state, rt.device, scaler_enabled=run.scaler.is_enabled())
    keep_best = spec.output is not None and spec.output.from_ == "best"
    serve_metrics(run)
    log_if_main(rt, "training %s: %d steps, world size %d, %d train samples, precision %s", run.job.metadata.name,
                run.total_steps, rt.world_size, len(run.train_set), t.precision)
    run.model.train()
    while state.step < run.total_steps and not early.should_stop:  # a rerun of an early-stopped job trains no more
        if run.schedule.steps_in_epoch(state.epoch, state.cursor) == 0:
            state.epoch, state.cursor = state.epoch + 1, 0
            continue
        batches = run.schedule.step(state.epoch, state.cursor, rt.rank)
        seed_step(t.seed, rt.rank, state.step)  # this step's dropout, from (seed, rank, step) alone
        started = time.perf_counter()
        loss_sum, grad_norm = train_step(prepared.module, run.optimizer, run.scaler, prepared.batcher, batches, task=run.task,
                                         rt=rt, autocast=run.autocast, max_grad_norm=t.max_grad_norm, graphs=prepared.graphs,
                                         loss_fn=prepared.loss)
        run.scheduler.step()
        guard.record(state.step + 1, loss_sum, grad_norm)
        epoch_done = advance(run, batches, time.perf_counter() - started)
        progress.record(batches, loss_sum, grad_norm, run.scheduler.get_last_lr()[0])
        if state.step == run.start.step + 1:  # after the first step the optimizer state exists
            log_if_main(rt, "memory on this rank (%s): parameters %.2f MB, optimizer state %.2f MB", t.strategy,
                        local_bytes(run.model) / 1e6, local_bytes(run.optimizer) / 1e6)

        last = state.step == run.total_steps
        if state.step % t.log_every_steps == 0 or last:
            progress.flush(epoch=state.epoch + (0 if epoch_done else state.cursor / max(1, len(run.schedule.plan(state.epoch)))))
            guard.check()
        eval_due = t.eval_every_steps and state.step % t.eval_every_steps == 0
        if run.eval_set and (eval_due or (t.eval_every_steps is None and epoch_done) or last):
            state.last_eval = run_eval(run)
            progress.report_eval(state.last_eval)
            if early.update(state.last_eval) and keep_best:
                keep_best_checkpoint(run, guard, periodic=state.step % spec.checkpoint.every_steps == 0, last=last)
        if state.step % spec.checkpoint.every_steps == 0 and not last:
            guard.check()  # no checkpoint holds a diverged state
            run.checkpointer.save(CheckpointReason.PERIODIC, wait=False)
        if stop.agreed(rt.device):
            guard.check()
            run.checkpointer.save(CheckpointReason.PREEMPTION, wait=True)
            write_exit_marker(rt.local_rank, "preempted", step=state.step)
            report_outcome(run, "preempted")
            log_if_main(rt, "preempted: emergency checkpoint at step %d saved; exiting %d", state.step, EXIT_PREEMPTED)
            return EXIT_PREEMPTED

    if early.should_stop:
        log_if_main(rt, "early stopping at step %d: %s did not improve for %d evaluations", state.step,
                    t.early_stopping.metric, early.spec.patience)
    guard.check()
    run.checkpointer.save(CheckpointReason.FINAL, wait=True)  # every rank waits until it is complete in the store
    exported = export_run(run) if spec.output else None  # before "finished": a failed export is a failed attempt
    write_exit_marker(rt.local_rank, "finished", step=state.step)
    log_if_main(rt, "finished at step %d; eval %s", state.step, state.last_eval or "-")
    report_outcome(run, "finished", exported)
    if tracker:
        tracker.finish("FINISHED", exported.local if exported else None)
    if run.metrics and run.opts.metrics_port and spec.metrics.linger_seconds:
        time.sleep(spec.metrics.linger_seconds)  # let Prometheus scrape the final values
    return 0


def keep_best_checkpoint(run: Run, guard: NonFiniteGuard, *, periodic: bool, last: bool) -> None:
    """output.from: best: this step's weights are the best so far; its checkpoint survives retention. The
    periodic and final saves of this step already write it; otherwise it is saved now."""
    run.checkpointer.store.kept = {run.state.step}
    if not (periodic or last):
        guard.check()
        run.checkpointer.save(CheckpointReason.BEST, wait=False)


def advance(run: Run, batches: StepBatches, seconds: float) -> bool:
    """Move the TrainState past one finished step; returns whether it ended the epoch."""
    state = run.state
    state.step += 1
    state.cursor += run.schedule.micro_per_step
    state.samples_seen += batches.global_samples
    state.tokens_seen += batches.global_tokens
    epoch_done = run.schedule.steps_in_epoch(state.epoch, state.cursor) == 0
    if epoch_done:
        state.epoch, state.cursor = state.epoch + 1, 0
    state.productive_seconds += seconds
    return epoch_done


def run_eval(run: Run) -> dict[str, float]:
    metrics = evaluate(run.model, run.eval_set, run.eval_batches, task=run.task, num_labels=run.job.spec.model.num_labels,
                       device=run.rt.device, autocast=run.autocast, pad_id=run.tokenizer.pad_token_id)
    if run.answers is not None:
        metrics |= generation_metrics(run.model, run.answers, run.job.spec.training.generation_eval, run.tokenizer,
                                      device=run.rt.device, autocast=run.autocast,
                                      synced=run.job.spec.training.strategy == "fsdp")
    return metrics


def serve_metrics(run: Run) -> None:
    metrics, opts = run.metrics, run.opts
    if not metrics:
        return
    metrics.resumed_from_step.set(run.state.step)
    metrics.step.set(run.state.step)  # the operator learns where the run started before its first log step
    start = run.start
    metrics.started_from.labels(start.checkpoint or "", start.why[:300], "; ".join(start.changed)[:1000]).set(start.step)
    metrics.world_size.set(run.rt.world_size)
    metrics.total_steps.set(run.total_steps)
    if opts.metrics_port:
        try:
            metrics.serve(opts.metrics_port, opts.metrics_addr)
        except OSError as err:  # e.g. two local jobs on one port: train anyway, without /metrics
            log.warning("cannot serve /metrics on %s:%d (%s): metrics disabled", opts.metrics_addr, opts.metrics_port, err)


def report_outcome(run: Run, outcome: str, exported: Exported | None = None) -> None:
    """Rank 0 leaves the final step, newest checkpoint and exported model in the pod's termination message."""
    if run.rt.is_main:
        ckpt = run.checkpointer.latest
        output = ({"uri": exported.uri, "step": exported.step, "formats": exported.formats, "metrics": exported.metrics}
                  if exported else None)
        write_report(TrainerReport(outcome, run.state.step, ckpt.step if ckpt else None, ckpt.uri if ckpt else None,
                                   ckpt.created if ckpt else None, start=run.start.to_json(), output=output))


def train_step(module, optimizer, scaler, batcher, batches: StepBatches, *, task: Task, rt: Runtime,
               autocast, max_grad_norm: float | None, graphs: StepGraphs | None = None, loss_fn=None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches; returns (local loss sum, grad norm) as tensors.

    Each micro-batch's summed loss is scaled by world_size / (global targets of the step), so after
    DDP's gradient averaging the update is the exact per-sample (or per-token) mean over the whole
    step, however unevenly the token budget split the samples. `batcher` turns a micro-batch's sample
    indices into the module's inputs on the device (padded or packed).
    """
    scale = rt.world_size / batches.global_targets
    if graphs is not None and len(batches.micro_batches) == 1:
        return graphs.step(batcher(batches.micro_batches[0]), scale)
    loss_total = torch.zeros((), device=rt.device)
    is_ddp = isinstance(unwrapped(module), DistributedDataParallel)
    for i, indices in enumerate(batches.micro_batches):
        sync = i == len(batches.micro_batches) - 1 or not is_ddp
        with contextlib.nullcontext() if sync else unwrapped(module).no_sync():
            loss = micro_batch_loss(module, batcher(indices), task=task, autocast=autocast, loss_fn=loss_fn)
            scaler.scale(loss * scale).backward()
        loss_total += loss.detach()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm, divisor = clip_gradients(optimizer, params, max_grad_norm, scaler_enabled=scaler.is_enabled())
    if scaler.is_enabled():
        scaler.step(optimizer)  # skips a step whose gradients overflowed, and lowers the scale
    else:
        with update_skipped_if_non_finite(optimizer, grad_norm), divided_in_update(optimizer, divisor):
            optimizer.step()
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_total, grad_norm


def log_if_main(rt: Runtime, msg: str, *args) -> None:
    if rt.is_main:
        log.info(msg, *args)

