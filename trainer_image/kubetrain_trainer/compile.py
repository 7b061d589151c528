"""torch.compile for the training forward/backward (`spec.training.compile`), with few batch shapes.

- "default": Inductor fuses the elementwise work (layer norms, GELU, dropout, softmax) around the
  matmuls; compiled once with dynamic shapes, so variable batch widths do not recompile.
- "regional": each transformer block's forward compiled alone, dynamic shapes; the blocks share one
  graph (the same code, the parameters as inputs), so a 16- or 32-layer model compiles once, in seconds,
  not once per layer or as one huge graph. The embeddings, the head and the loss stay eager. Hooks
  (fsdp's gathers, activation checkpointing) stay outside the compiled region, so it suits every strategy.
- "reduce-overhead": the same as default, and the whole step (forward, backward, clipping, AdamW) is replayed as
  one CUDA graph per batch shape (`graphs.StepGraphs`). One graph per shape, so widths are rounded up
  to a multiple of 8 (cap/16 for long caps) and batches are filled to maxSamplesPerBatch rows (see
  batching.BatchShapes; packed rows: packing.PackedShapes). One GPU, no gradient accumulation, bf16 or
  fp32; otherwise "default". A model whose forward computes the loss (the fused causal-LM loss) has its
  blocks compiled as "regional" does under the graphs: a whole LM compiles for minutes, and its head's
  chunked loss runs outside a compiled graph anyway; captured, the host's per-block cost is gone too.
Evaluation and checkpoints use the uncompiled module, which shares the parameters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from kubetrain.api import DataSpec

from .batching import BatchShapes
from .packing import PackedShapes

log = logging.getLogger("kubetrain.compile")


def batch_shapes(mode: str, data: DataSpec) -> BatchShapes | PackedShapes | None:
    if mode in ("off", "regional"):  # regional: dynamic shapes inside each block, any batch
        return None
    if data.packing:  # dynamic shapes take any row; graphs want few row lengths and a fixed sample count
        return PackedShapes(samples=data.max_samples_per_batch or 0, max_segment=data.max_length) if mode == "reduce-overhead" else None
    width_multiple = max(8, data.max_length // 16)
    if mode == "default":
        return BatchShapes(width_multiple=width_multiple)
    rows = data.max_samples_per_batch or 8  # without a sample cap, batch sizes vary and graphs are captured as met
    return BatchShapes(width_multiple=width_multiple, rows=rows, rows_multiple=8)


@dataclass(frozen=True)
class Compiled:
    """The module to train with and how to feed it: `shapes` for its batches (None: any), and whether
    the whole step is captured as CUDA graphs (`graphs.StepGraphs`)."""

    module: torch.nn.Module
    shapes: BatchShapes | PackedShapes | None = None
    step_graphs: bool = False


def compile_for_training(module: torch.nn.Module, mode: str, data: DataSpec, *, world_size: int, grad_accum: int,
                         device: torch.device, precision: str, strategy: str = "ddp", loss_in_forward: bool = False
                         ) -> Compiled:
    """`module` itself when mode is off, else a compiled wrapper of it, with its batch shapes.
    `loss_in_forward`: the module's forward returns the loss (training.fusedLoss)."""
    if mode == "off":
        return Compiled(module)
    if mode == "reduce-overhead" and (world_size > 1 or grad_accum > 1 or device.type != "cuda" or precision == "fp16"
                                      or strategy != "ddp"):
        log.warning("compile: reduce-overhead (CUDA graphs of the whole step) needs one GPU, strategy ddp, "
                    "gradientAccumulation 1 and bf16 or fp32; using default")
        mode = "default"
    if mode == "reduce-overhead" and loss_in_forward:
        blocks = compile_blocks(module)
        if blocks:
            log.info("compile: reduce-overhead, %d transformer blocks compiled as one graph, the step as CUDA graphs",
                     blocks)
            return Compiled(module, batch_shapes(mode, data), step_graphs=True)
    if mode == "regional":
        blocks = compile_blocks(module)
        if blocks:
            log.info("compile: regional, %d transformer blocks, one graph", blocks)
            return Compiled(module)
        log.warning("compile: regional needs repeated transformer blocks (transformers' _no_split_modules), and this "
                    "model has none; using default")
        mode = "default"
    compiled = Compiled(torch.compile(module, dynamic=True), batch_shapes(mode, data), step_graphs=mode == "reduce-overhead")
    log.info("compile: torch.compile (%s), batch shapes %s", mode, compiled.shapes)
    return compiled


def compile_blocks(module: torch.nn.Module) -> int:
    """Compile each transformer block's forward in place; returns how many. Module hooks stay eager around it."""
    from .sharding import transformer_blocks

    blocks = transformer_blocks(module)
    for block in blocks:
        block.forward = torch.compile(block.forward, dynamic=True)
    return len(blocks)


def unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """The module under a torch.compile wrapper (e.g. to test for DDP)."""
    return getattr(module, "_orig_mod", module)
