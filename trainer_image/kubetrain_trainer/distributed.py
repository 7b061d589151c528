"""The process group: one torchrun worker's rank, device and backend (nccl on GPU, gloo on CPU)."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: int = 1800) -> Runtime:
    """Join the group torchrun set up (RANK/WORLD_SIZE/MASTER_ADDR env); a single process also works."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), device_id=device if backend == "nccl" else None)
    return Runtime(rank, local_rank, world_size, device)


def ensure_process_group(rt: Runtime) -> None:
    """A process group even for one process (FSDP's device mesh needs one): a local store, no rendezvous."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if rt.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=rt.rank,
                                world_size=rt.world_size, device_id=rt.device if rt.device.type == "cuda" else None)


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def configure_determinism(deterministic: bool) -> None:
    """Bitwise-reproducible kernels when asked: needed for exact resume checks, costs speed."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed this rank's streams (dropout) for the step about to be taken, from (seed, rank, step) alone.

    A rank's randomness is then no state at all: any checkpoint, a rescue one written by a survivor
    for a peer that died included, resumes every rank's streams exactly, on any world size.
    """
    mixed = np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0]
    torch.manual_seed(int(mixed) & ((1 << 63) - 1))
