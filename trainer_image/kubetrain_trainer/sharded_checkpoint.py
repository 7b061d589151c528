"""Sharded checkpoints (training.strategy: fsdp): every rank saves its own shards, with the store's protocol.

A checkpoint is the usual files of rank 0 (training.pt, state.json) plus `shards/`, written by
torch.distributed.checkpoint (DCP): one `__<rank>_0.distcp` per rank and rank 0's `.metadata`, which
maps every tensor's pieces to files by parameter name, so a checkpoint loads on any number of ranks
(DCP reshards on load).

Saving, per rank:
1. in the training thread, the stall: this rank's shards are copied into host buffers kept across saves
   (pinned on a GPU; `PinnedStager`), and DCP's writer thread serializes them to the rank's local staging directory;
2. in the checkpointer's writer thread: wait for that, rank 0 clears an older save of the same step,
   every rank uploads its part (retried through outages), the parts' hashes are gathered, and rank 0
   writes the manifest listing every file of every rank: the checkpoint is complete only once all parts
   landed, and a torn one (a part or the manifest missing) is never loaded.
The writer threads talk over a gloo group of their own, so they never interleave with training's
collectives. Every rank learns whether the save landed (the gathered outcomes), so all raise alike.

Restoring: every rank downloads the chosen checkpoint (verified against the manifest) and DCP loads the
pieces of its own shards from it.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .checkpoint_store import CheckpointError, CheckpointStore, SaveResult
from .distributed import Runtime, all_reduce
from .failures import PermanentError, StorageError, describe, one_line
from .host_copies import PinnedStager

SHARDS_DIR = "shards"


class Shards:
    def __init__(self, component, rt: Runtime, store: CheckpointStore):
        self.component, self.rt, self.store = component, rt, store
        # a CPU group for the background threads (DCP's async save needs one; NCCL's is training's)
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.stager = PinnedStager(pinned=rt.device.type == "cuda")

    def busy(self, pending: Future | None) -> bool:
        """Collective: is any rank's previous save still landing?"""
        mine = torch.tensor(int(pending is not None and not pending.done()), device=self.rt.device)
        return bool(all_reduce(mine, op=dist.ReduceOp.MAX).item())

    def stage(self, staging: Path) -> Future:
        """This rank's shards to host memory now; their serialization to `staging/shards` goes on behind."""
        return dcp.async_save({SHARDS_DIR: self.component}, storage_writer=dcp.FileSystemWriter(staging / SHARDS_DIR),
                              process_group=self.group, async_stager=self.stager)

    def land(self, step: int, staging: Path, written: Future, write_main_files: Callable[[], dict[str, Path]],
             meta: dict, started: float) -> SaveResult:
        """Background, every rank: upload this rank's part, gather every part, rank 0 writes the manifest.

        Every rank joins each collective whatever failed before it, so a failure is everyone's answer, not a hang."""
        files, outcome = {}, {}
        try:
            written.result()
            files = {f"{SHARDS_DIR}/{p.name}": p for p in sorted((staging / SHARDS_DIR).iterdir()) if p.is_file()}
            if self.rt.is_main:
                files |= write_main_files()
                self.store.clear(step)
        except Exception as err:  # noqa: BLE001
            outcome = self._failed(err)
        self._barrier()  # no part lands before an older save of this step is gone
        if not outcome:
            try:
                outcome = {"entries": self.store.upload_part(step, files)}
            except Exception as err:  # noqa: BLE001
                outcome = self._failed(err)
        parts = self._gather(outcome)
        result: SaveResult | str | None = None
        errors = [p for p in parts if "error" in p]
        if errors:
            failure = "; ".join(p["error"] for p in errors)
            kind = StorageError if any(p["permanent"] for p in errors) else CheckpointError
        elif self.rt.is_main:
            try:
                result = self.store.commit(step, {n: e for p in parts for n, e in p["entries"].items()}, meta, started)
            except Exception as err:  # noqa: BLE001
                result = self._failed(err)["error"]
        result = self._broadcast(result)
        if errors:
            raise kind(f"checkpoint step {step}: {failure}")
        if isinstance(result, str):
            raise CheckpointError(f"checkpoint step {step}: {result}")
        return result

    def _failed(self, err: BaseException) -> dict:
        failure = describe(err)  # a permanent error is raised again as one, whose kind starts its message then
        text = one_line(str(err)) if isinstance(err, PermanentError) else failure.message
        return {"error": f"rank {self.rt.rank}: {text}", "permanent": failure.permanent}

    def load(self, dest: Path) -> None:
        """Collective: this rank's shards from the downloaded checkpoint in `dest` (any world size wrote it)."""
        target = {SHARDS_DIR: self.component}
        dcp.load(target, storage_reader=dcp.FileSystemReader(dest / SHARDS_DIR))

    def _barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)

    def _gather(self, outcome: dict) -> list[dict]:
        if self.group is None:
            return [outcome]
        parts: list = [None] * self.rt.world_size
        dist.all_gather_object(parts, outcome, group=self.group)
        return parts

    def _broadcast(self, result: SaveResult | None) -> SaveResult:
        if self.group is not None:
            box = [result]
            dist.broadcast_object_list(box, src=0, group=self.group)
            result = box[0]
        return result
