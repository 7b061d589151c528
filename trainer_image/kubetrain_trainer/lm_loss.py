"""The causal-LM loss without the full logits (training.fusedLoss): the LM head and the cross-entropy fused,
chunk by chunk.

The plain path materialises logits [tokens, vocab] in the compute dtype, again in fp32 for the loss, and
their gradient: at 8k tokens and Llama 3's 128k vocabulary that is about 10 GB, the largest activation of
the step. Here the forward walks the tokens in chunks: each chunk's logits are computed, turned into its
loss and straight into its gradients (softmax minus one-hot, times the head's weight for the hidden
states; accumulated into the head's gradient), then freed; backward only scales the stored gradients.
Three matmuls as in the plain path, no recompute; at most one chunk of logits is alive (the algorithm of
liger-kernel's fused linear cross-entropy, in torch ops: it runs on every device, compiles, and needs no
Triton, so CPU tests run the same code as the GPU).

Under `training.compile` the chunk's softmax, loss and gradient are one compiled function: Inductor reads
the logits once and writes their gradient once, where eager torch passes over the [chunk, vocab] block
about six times (measured on a 1B Llama with a 49k vocabulary: 9.7 ms of a 129 ms step outside the
three matmuls, eager).

It runs as the LM head's own forward inside the model's (`FusedLossLM`), where FSDP has the head's weight
gathered.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch

from .data import IGNORE_LABEL

CHUNK_LOGITS = 2**29  # logits of one chunk at most: 2 GiB in fp32 (4,096 tokens at Llama 3's 128k vocabulary)
# config attributes that change logits after the head: a model with one set keeps the plain path
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk: as many as CHUNK_LOGITS allows, in steps of 1,024 (fewer chunks, fewer passes over
    the head's gradient), at least 1,024."""
    return max(1024, CHUNK_LOGITS // vocab_size // 1024 * 1024)


def chunk_loss_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed cross-entropy and its gradient with respect to the logits (softmax minus one-hot,
    zero on ignored rows), in the logits' dtype; computed in fp32."""
    keep = targets != IGNORE_LABEL
    safe = torch.where(keep, targets, 0)
    scores = logits.float()
    lse = torch.logsumexp(scores, dim=-1)
    loss = ((lse - scores.gather(1, safe[:, None])[:, 0]) * keep).sum()
    grad = torch.softmax(scores, dim=-1)
    if torch.compiler.is_compiling():  # a comparison fuses into the softmax's pass; a scatter would not
        grad = grad - (torch.arange(grad.shape[1], device=grad.device) == safe[:, None]).to(grad.dtype)
    else:  # eagerly, one small scatter instead of a [chunk, vocab] mask
        grad.scatter_add_(1, safe[:, None], -torch.ones_like(grad[:, :1]))
    return loss, (grad * keep[:, None]).to(logits.dtype)


@functools.cache
def compiled_chunk_loss_and_grad():
    """chunk_loss_and_grad compiled once per process (dynamic shapes: the last chunk of a step is shorter)."""
    return torch.compile(chunk_loss_and_grad, dynamic=True)


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, compiled: bool):
        loss_and_grad = compiled_chunk_loss_and_grad() if compiled else chunk_loss_and_grad
        grad_hidden = torch.zeros_like(hidden)
        needs_weight_grad = ctx.needs_input_grad[1]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start : start + chunk], targets[start : start + chunk]
            loss, grad = loss_and_grad(h @ weight.t(), t)
            total += loss
            grad_hidden[start : start + chunk] = grad @ weight
            if grad_weight is not None:
                grad_weight += (grad.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.weight_dtype, ctx.has_weight_grad = weight.dtype, grad_weight is not None
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.to(grad_hidden.dtype)
        weight_grad = (grad_weight * grad_output).to(ctx.weight_dtype) if ctx.has_weight_grad else None
        return grad_hidden * scale, weight_grad, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None,
                             compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of cross-entropies of `hidden @ weight.T` against `targets`, how many targets), IGNORE_LABEL skipped.
    hidden [tokens, dim] and weight [vocab, dim] in the compute dtype (autocast's, if on); `compiled`: each
    chunk's softmax and gradient through torch.compile."""
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
    with torch.autocast(hidden.device.type, enabled=False):
        loss = _LinearCrossEntropySum.apply(hidden.to(dtype), weight.to(dtype), targets, chunk or chunk_tokens(weight.shape[0]),
                                            compiled)
    return loss, (targets != IGNORE_LABEL).sum()


def fusable(model: torch.nn.Module) -> str | None:
    """Why this model's loss cannot be fused (None: it can): a bias on the head, or logits changed after it."""
    from .packing import hf_model

    inner = hf_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:  # e.g. peft's LoRA layer where lm_head is a target module
        return f"{inner.config.model_type}'s LM head is not a plain linear layer"
    if head.bias is not None:
        return "its LM head has a bias"
    changed = [a for a in LOGIT_TRANSFORMS if getattr(inner.config, a, None) not in (None, 1, 1.0)]
    return f"its logits are transformed after the head ({changed[0]})" if changed else None


@dataclass
class LossOutput:
    loss_sum: torch.Tensor
    count: torch.Tensor


class FusedLossLM(torch.nn.Module):
    """A causal LM whose training forward, given each position's target, returns the summed loss (LossOutput);
    without targets it is the model itself (logits).

    The loss is computed by the LM head module itself, inside the model's own forward: under FSDP the root's
    forward is what gathers the head's (and embeddings') weights and hooks their gradients' reduction, so
    the backbone cannot be called around it. The head instance's `forward` is replaced (its module, weight
    and state-dict keys stay as they are); with no targets set it is the plain linear layer.
    """

    def __init__(self, model: torch.nn.Module, compiled: bool = False):
        super().__init__()
        self.model = model
        self.head = self.get_base_model().get_output_embeddings()
        self.head.fused_targets = None
        self.head.fused_compiled = compiled  # each chunk's softmax and gradient through torch.compile
        self.head.forward = types.MethodType(_head_forward, self.head)

    def get_base_model(self) -> torch.nn.Module:
        """The transformers model (packing and the checks look through this wrapper, as through peft's)."""
        from .packing import hf_model

        return hf_model(self.model)

    def forward(self, targets: torch.Tensor | None = None, **inputs):
        if targets is None:
            return self.model(**inputs)
        self.head.fused_targets = targets
        try:
            out = self.model(**inputs)
        finally:
            self.head.fused_targets = None
        return LossOutput(out.logits[0], out.logits[1])


@torch.compiler.disable  # the chunk loop runs eagerly; the model around it still compiles
def _head_forward(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """An LM head's forward: logits, or, with targets set by FusedLossLM, [summed loss, count] for them."""
    if head.fused_targets is None:
        return torch.nn.functional.linear(hidden, head.weight, head.bias)
    loss, count = linear_cross_entropy_sum(hidden.flatten(0, -2), head.weight, head.fused_targets.flatten(),
                                           compiled=head.fused_compiled)
    return torch.stack([loss, count.to(loss.dtype)])


def position_targets(batch: dict[str, torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
    """Each position's target: the batch's own (packed rows, or rows that train some tokens only), else the
    next token where it is real (padded rows of plain text)."""
    if labels is not None:
        return labels
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = torch.full_like(ids, IGNORE_LABEL)
    targets[:, :-1] = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_LABEL)
    return targets


def fused_loss(module: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor | None):
    """train_step's forward and loss through a FusedLossLM (under packing, DDP and compile wrappers)."""
    out = module(**batch, targets=position_targets(batch, labels))
    return out.loss_sum, out.count
