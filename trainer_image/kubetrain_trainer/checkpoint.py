"""How the trainer saves and restores checkpoints (what they hold: `checkpoint_state`; how they land: the store).

A checkpoint is the complete state for exact resume: the registered components of
`checkpoint_state.CheckpointContent` (trained weights, optimizer, LR scheduler, grad scaler, every
rank's RNG streams, the TrainState). Rank 0 writes the files locally and hands them to the store, which uploads them in the
background with the manifest last; periodic saves return at once, final and emergency saves wait.
When storage is slower than the checkpoint interval (an S3 outage), a snapshot still waiting to be
written is dropped for the newer one: host memory holds at most two snapshots, and the newest state
is the one that lands once storage is back.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from kubetrain.contracts import CheckpointReason

from .checkpoint_state import CheckpointContent, TrainState
from .checkpoint_store import CheckpointInfo, CheckpointStore
from .distributed import Runtime, barrier, broadcast_object
from .failures import IncompatibleCheckpoint, PermanentError
from .host_copies import snapshot_to_cpu
from .metrics import TrainerMetrics
from .resume import Start, differences, refusal
from .sharded_checkpoint import SHARDS_DIR, Shards

log = logging.getLogger("kubetrain.checkpoint")


class LatestWinsWriter:
    """One background thread running submitted jobs in order, except that a job still waiting when a
    newer one is submitted is cancelled (its future says so): only the newest waiting job matters."""

    def __init__(self, name: str):
        self._cond = threading.Condition()
        self._waiting: tuple[Future, Callable[[], object]] | None = None
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, job: Callable[[], object]) -> Future:
        future: Future = Future()
        with self._cond:
            superseded, self._waiting = self._waiting, (future, job)
            self._cond.notify()
        if superseded is not None:
            superseded[0].cancel()  # outside the lock: cancel runs the future's callbacks
        return future

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._waiting is None:
                    self._cond.wait()
                (future, job), self._waiting = self._waiting, None
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(job())
            except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(e)


@dataclass(frozen=True)
class Chosen:
    """The checkpoint a run resumes (None: from scratch), the newer corrupt ones skipped, rank 0's verified files."""

    info: CheckpointInfo | None
    skipped: list[str]
    paths: dict[str, Path] | None = None


class Checkpointer:
    """Saves and restores the registered `content`; `state` (the TrainState, registered too) gives the step."""

    def __init__(self, store: CheckpointStore, work_dir: Path, rt: Runtime, metrics: TrainerMetrics | None,
                 content: CheckpointContent, state: TrainState, record: dict | None = None,
                 shards: Shards | None = None):
        self.store, self.work_dir, self.rt, self.metrics = store, work_dir, rt, metrics
        self.content, self.state = content, state
        self.shards = shards  # training.strategy fsdp: every rank saves and loads its shards (sharded_checkpoint)
        self.record = record or {}  # written into every manifest's meta: the model identity, the settings, the job uid
        self.submitted_step: int | None = None
        self.pending: Future | None = None  # the newest submitted save, done once accounted (rank 0)
        self.latest: CheckpointInfo | None = None  # the newest complete checkpoint known (rank 0)
        self.permanent_failure: PermanentError | None = None  # a save no retry can fix (rank 0): the next save raises it
        # one writer thread: snapshots land in the order they were taken, a waiting one replaced by a newer one
        self._writer = LatestWinsWriter("kubetrain-ckpt-write")

    def save(self, reason: str, wait: bool) -> None:
        """Collective: every rank must call it (components may gather, e.g. the RNG states).

        A step already submitted (a periodic save, then SIGTERM at the same step) is not saved
        again: `wait` then only waits for that save to land.
        """
        if self.permanent_failure is not None:  # e.g. access denied: training on would only lose more work
            raise self.permanent_failure
        if self.shards is not None:
            return self._save_sharded(reason, wait)
        if self.state.step != self.submitted_step:
            self._submit(reason)
        if wait:
            if self.rt.is_main:
                # This save's own outcome: an earlier periodic failure was already logged and counted.
                self.pending.result()
            barrier()  # no rank exits (or reports the checkpoint) before it is complete in the store

    def _save_sharded(self, reason: str, wait: bool) -> None:
        """Every rank writes its shards. One save is in flight at a time: all ranks agree (a collective) whether
        the last one is still landing; if so a periodic save is skipped (storage is slower than the interval),
        and a final or emergency one waits for it first."""
        if self.state.step != self.submitted_step:
            if self.shards.busy(self.pending):
                if not wait:
                    if self.rt.is_main:
                        log.warning("checkpoint step %d (%s) skipped: the previous one is still being written "
                                    "(storage is slower than the checkpoint interval)", self.state.step, reason)
                        if self.metrics:
                            self.metrics.checkpoints_superseded.inc()
                    return
                self.drain()
            self._submit(reason)
        if wait:
            self.pending.result()  # every rank: each learns the outcome of every rank's part

    def rescue(self) -> CheckpointInfo | None:
        """Rank 0 alone, after a peer died: save the current (complete, consistent) state unless a save of
        this step is under way already, and wait until it is complete in the store. No collectives.
        Sharded state is spread over the ranks: no rank can save it alone."""
        if not self.rt.is_main or self.shards is not None:
            return None
        if self.state.step != self.submitted_step:
            self._submit(CheckpointReason.RESCUE)
        self.pending.result()
        return self.latest

    def drain(self) -> None:
        """Let a save already under way land before the process exits on a failure (rank 0; never raises)."""
        if self.pending is not None:
            try:
                self.pending.result()
            except BaseException:  # noqa: BLE001 - logged by _landed; the failure being raised matters more
                pass

    def settle_latest(self) -> CheckpointInfo | None:
        """Collective, for a failure every rank found at once (divergence): rank 0 lets its save under way land
        and tells every rank the newest complete checkpoint, so whichever pod reports first names it."""
        if self.rt.is_main:
            self.drain()
        self.latest = broadcast_object(self.latest)
        return self.latest

    def _submit(self, reason: str) -> None:
        """Training stalls only for a CPU snapshot; serialization and the upload run in the background."""
        started = time.perf_counter()
        live = self.content.state_dicts()  # every rank: components may run collectives
        self.submitted_step = step = self.state.step  # `state` moves on while the writer works
        if self.shards is not None:
            staging = self.work_dir / "staging" / f"step-{step:09d}-{reason}-rank-{self.rt.rank}"
            shutil.rmtree(staging, ignore_errors=True)
            written = self.shards.stage(staging)  # this rank's shards copied to host memory: the stall
            snapshot = snapshot_to_cpu(live) if self.rt.is_main else {}
            stall = time.perf_counter() - started
            meta = {"reason": reason, "world_size": self.rt.world_size, "state": self.state.state_dict(),
                    "stall_seconds": stall, "sharded": True, **self.record}
            landed = self.pending = Future()
            upload = self._writer.submit(lambda: self.shards.land(
                step, staging, written, lambda: self._write_files(staging, snapshot), meta, started))
            upload.add_done_callback(lambda f: self._landed(f, step, staging, reason, stall, landed))
            return
        if self.rt.is_main:
            snapshot = snapshot_to_cpu(live)
            stall = time.perf_counter() - started
            staging = self.work_dir / "staging" / f"step-{step:09d}-{reason}"
            meta = {"reason": reason, "world_size": self.rt.world_size, "state": self.state.state_dict(), "stall_seconds": stall,
                    **self.record}
            landed = self.pending = Future()  # done after _landed: a waiter sees the metrics updated
            upload = self._writer.submit(lambda: self._write_and_upload(step, staging, snapshot, meta))
            upload.add_done_callback(lambda f: self._landed(f, step, staging, reason, stall, landed))

    def _write_and_upload(self, step: int, staging: Path, snapshot: dict, meta: dict):
        """Background: serialize the snapshot, then upload it (manifest last) through the store."""
        shutil.rmtree(staging, ignore_errors=True)
        return self.store.save(step, self._write_files(staging, snapshot), meta)

    def _write_files(self, staging: Path, snapshot: dict) -> dict[str, Path]:
        staging.mkdir(parents=True, exist_ok=True)
        files = {name: staging / name for name in snapshot}
        for name, state in snapshot.items():
            self.content.write(name, state, files[name])
        return files

    def _landed(self, future: Future, step: int, staging: Path, reason: str, stall: float, landed: Future) -> None:
        if future.cancelled():  # a newer snapshot was taken before this one could be written
            log.warning("checkpoint step %d (%s) skipped: storage is slower than the checkpoint interval, "
                        "a newer snapshot replaces it", step, reason)
            if self.metrics:
                self.metrics.checkpoints_superseded.inc()
            landed.cancel()
            return
        try:
            self._account(future, staging, reason, stall)
        finally:
            if future.exception() is not None:
                landed.set_exception(future.exception())
            else:
                landed.set_result(future.result())

    def _account(self, future: Future, staging: Path, reason: str, stall: float) -> None:
        shutil.rmtree(staging, ignore_errors=True)
        if future.exception() is not None:
            log.error("checkpoint failed: %s", future.exception())
            if isinstance(future.exception(), PermanentError):
                self.permanent_failure = future.exception()
            if self.metrics:
                self.metrics.checkpoint_failures.inc()
            return
        result = future.result()
        if self.latest is None or result.info.step >= self.latest.step:
            self.latest = result.info
        log.info("checkpoint step %d (%s) complete: %s, %.1f MB, %.2fs upload", result.info.step, reason,
                 result.info.uri, result.info.bytes / 1e6, result.seconds)
        if self.metrics:
            m = self.metrics
            m.checkpoint_duration.labels("stall").observe(stall)
            m.checkpoint_duration.labels("upload").observe(result.seconds)
            m.last_checkpoint_duration.labels("stall").set(stall)
            m.last_checkpoint_duration.labels("upload").set(result.seconds)
            m.checkpoints.labels(reason).inc()
            m.checkpoint_bytes.set(result.info.bytes)
            m.last_checkpoint_step.set(result.info.step)
            m.last_checkpoint_timestamp.set(time.time())

    def restore(self) -> Start:
        return self.load(self.choose())

    def choose(self) -> Chosen:
        """Collective: the newest complete checkpoint that this job may resume (None: scratch).

        Rank 0 chooses (falling back past corrupt ones, downloading and verifying the one it takes) and
        every rank learns the choice: a checkpoint of another model is refused on every rank at once
        (IncompatibleCheckpoint), not left to a hang. The composition root reads its settings (e.g. the
        micro-batches per step) before building what depends on them, then calls `load`.
        """
        dest = self._restore_dir()
        shutil.rmtree(dest, ignore_errors=True)
        decision, paths = None, None
        if self.rt.is_main:
            skipped: list[str] = []
            try:
                found = self.store.restore_latest(dest, accept=self._accept, skipped=skipped)
                decision = ("found", found[0] if found else None, skipped)
                paths = found[1] if found else None
            except IncompatibleCheckpoint as err:
                decision = ("refused", str(err), skipped)
        kind, chosen, skipped = broadcast_object(decision)
        if kind == "refused":
            raise IncompatibleCheckpoint(chosen)
        return Chosen(chosen, skipped, paths)

    def load(self, chosen: Chosen) -> Start:
        """Collective: load the chosen checkpoint into every registered component on every rank."""
        self.latest = info = chosen.info
        where = self.store.storage.uri(self.store.prefix)
        if info is None:
            why = (f"all {len(chosen.skipped)} checkpoint(s) under {where} were corrupt or torn" if chosen.skipped
                   else f"no complete checkpoint under {where}")
            return Start(0, None, why)
        dest = self._restore_dir()
        self.content.load(chosen.paths if chosen.paths is not None else self.store.download(info, dest))
        if self.shards is not None:
            self.shards.load(dest)
        shutil.rmtree(dest, ignore_errors=True)
        why = f"newest complete checkpoint under {where}" + (
            f" ({len(chosen.skipped)} newer one(s) corrupt, skipped)" if chosen.skipped else "")
        settings = info.meta.get("settings")
        changed = differences(settings, self.record.get("settings", {})) if isinstance(settings, dict) else []
        return Start(self.state.step, info.uri, why, changed)

    def _restore_dir(self) -> Path:
        return self.work_dir / "restore" / f"rank-{self.rt.rank}"

    def _accept(self, info: CheckpointInfo) -> None:
        sharded = any(name.startswith(SHARDS_DIR + "/") for name in info.files)
        if sharded != (self.shards is not None):
            was, now = ("fsdp", "ddp") if sharded else ("ddp", "fsdp")
            raise IncompatibleCheckpoint(
                f"{info.uri} was written with training.strategy {was} ({'sharded' if sharded else 'whole-model'} files); "
                f"this job uses {now}. Resume it with strategy {was}, or train from scratch with "
                "spec.checkpoint.resume: never")
        fields = refusal(info.meta, self.record.get("identity", {}))
        if fields:
            raise IncompatibleCheckpoint(
                f"{info.uri} was written for another model ({'; '.join(fields)}); refusing to resume it. Train from "
                "scratch with spec.checkpoint.resume: never, or give this job another name or checkpoint.uri")
