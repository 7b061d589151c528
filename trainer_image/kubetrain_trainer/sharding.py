"""FSDP2 (`training.strategy: fsdp`): the model, its gradients and its optimizer state sharded over the ranks.

Each transformer block is one `fully_shard` unit (its parameters are all-gathered just before it runs and
freed after), then the root takes what is left (embeddings, head). Parameters are stored in fp32 (or,
for a frozen LoRA base, in the training precision) and all-gathered in bf16/fp16; gradients are
reduce-scattered in fp32, so the optimizer state is fp32 and 1/N of it lives on each rank.

Building: no rank holds the whole model in fp32 on its GPU, and only rank 0 in host memory. Every rank
builds the model with its parameters on the meta device (accelerate's init_empty_weights, which keeps the
buffers real: rotary frequencies are not in a state dict), shards it, and allocates its own shards;
rank 0 builds the real weights on the CPU (pretrained, or the seed's random init, the same values DDP
would train) and `set_model_state_dict(broadcast_from_rank0=True)` sends each rank its shards.
accelerate's FSDP plugin was not used: it wraps the same torch API behind its Accelerator object, which
would take over the loop, the scaler and the checkpoints that kubetrain already owns.

`shardAcross: node` shards inside a node and replicates across nodes (HSDP, a 2-D device mesh).
"""

from __future__ import annotations

import logging
import os

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from kubetrain.api import FsdpSpec

from .distributed import Runtime, ensure_process_group
from .model import trainable_state_dict

log = logging.getLogger("kubetrain.sharding")

COMPUTE_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_mesh(rt: Runtime, shard_across: str) -> DeviceMesh:
    """1-D over the world, or (nodes, processes per node) with sharding inside a node."""
    ensure_process_group(rt)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", rt.world_size))
    if shard_across == "node" and per_node < rt.world_size and rt.world_size % per_node == 0:
        return init_device_mesh(rt.device.type, (rt.world_size // per_node, per_node), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(rt.device.type, (rt.world_size,), mesh_dim_names=("shard",))


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: the classes transformers keeps whole (`_no_split_modules`)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or ())
    blocks = [m for m in inner.modules() if type(m).__name__ in names or isinstance(m, GradientCheckpointingLayer)]
    return [m for m in blocks if not any(m is not b and _contains(b, m) for b in blocks)]  # outermost only


def _contains(outer: torch.nn.Module, inner: torch.nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def shard_model(model: torch.nn.Module, rt: Runtime, spec: FsdpSpec, precision: str) -> torch.nn.Module:
    """`fully_shard` every block, then the root (in place: the model becomes an FSDPModule)."""
    mesh = device_mesh(rt, spec.shard_across)
    policy = MixedPrecisionPolicy(param_dtype=COMPUTE_DTYPES[precision], reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy() if spec.cpu_offload else OffloadPolicy()
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload)
    log.info("fsdp: %d blocks sharded over mesh %s (%s), compute %s, reduce fp32%s", len(blocks),
             tuple(mesh.shape), ", ".join(mesh.mesh_dim_names), precision, ", CPU offload" if spec.cpu_offload else "")
    return model


def materialize(model: torch.nn.Module, device: torch.device, full_state: dict[str, torch.Tensor] | None,
                cpu_offload: bool) -> None:
    """Allocate this rank's shards (they were on meta) and fill them from rank 0's `full_state`."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}  # real: init_empty_weights kept them
    model.to_empty(device="cpu" if cpu_offload else device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    set_model_state_dict(model, full_state or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                          strict=True))  # no shard left as to_empty made it


def local_bytes(module_or_optimizer) -> int:
    """Bytes of the parameters (a module) or state (an optimizer) that live on this rank."""
    def size(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    if isinstance(module_or_optimizer, torch.nn.Module):
        return sum(size(p) for p in module_or_optimizer.parameters())
    return sum(size(v) for state in module_or_optimizer.state.values() for v in state.values())


def gathered_state(model: torch.nn.Module, trained_only: bool) -> dict[str, torch.Tensor]:
    """The weights (or only the trained ones) as full CPU tensors. Sharded: gathered from every rank, a
    collective that every rank calls and rank 0 receives (the others get an empty dict); else this rank's own."""
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                    ignore_frozen_params=trained_only))
    return {name: t.detach().cpu() for name, t in trainable_state_dict(model, trained_only).items()}


class ShardedState:
    """The model's trained weights and the optimizer state as sharded tensors keyed by parameter name, for
    torch.distributed.checkpoint: world-size independent, so a checkpoint loads on any number of ranks."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, lora: bool):
        self.model, self.optimizer = model, optimizer
        self.options = StateDictOptions(ignore_frozen_params=lora)  # LoRA: the frozen base comes from spec.model
        self.load_options = StateDictOptions(ignore_frozen_params=lora, strict=not lora)

    def state_dict(self) -> dict:
        model, optim = get_state_dict(self.model, self.optimizer, options=self.options)
        return {"model": model, "optim": optim}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self.load_options)
