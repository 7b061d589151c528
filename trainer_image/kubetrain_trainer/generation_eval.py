"""Generation-based evaluation (training.generationEval): answer the first eval prompts greedily and score the
answers against the rows' own (exact match after whitespace normalisation, ROUGE-L F1 with rouge-score).

A row's prompt is everything before its last trained run of tokens (the last completion or assistant turn,
as the chat template renders it), and that run is the reference. Each rank answers every world_size-th
prompt; the sums are all-reduced, so the metrics are exact over the N prompts. Every rank makes as many
generate calls (a short one is filled with a repeated prompt, not counted), and under fsdp `synced_gpus`
keeps the ranks' forwards in step until the last of them is done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kubetrain.api import GenerationEvalSpec

from .data import DataError, Encoded
from .distributed import Runtime, all_reduce


@dataclass(frozen=True)
class Prompts:
    """The prompts this rank answers, their references, and the tokens that end an answer."""

    prompts: list[list[int]]
    references: list[str]
    stop_ids: list[int]
    batches: int  # generate calls, the same on every rank


def last_answer(trained: np.ndarray) -> tuple[int, int]:
    """[start, end) of the last run of trained tokens."""
    end = int(np.flatnonzero(trained)[-1]) + 1
    start = end
    while start > 0 and trained[start - 1]:
        start -= 1
    return start, end


def prompts_for(encoded: Encoded, spec: GenerationEvalSpec, tokenizer, rt: Runtime) -> Prompts:
    if encoded.trained is None:
        raise DataError("training.generationEval needs prompt-completion or chat eval rows (data.style), whose answers "
                        "it compares with; these eval rows are plain text")
    count = min(spec.samples, len(encoded))
    prompts, references, stops = [], [], {tokenizer.eos_token_id} - {None}
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for i in range(count):
        start, end = last_answer(encoded.trained[i])
        answer = encoded.input_ids[i][start:end].tolist()
        ends = [k for k, t in enumerate(answer) if t in special]
        if ends:  # EOS, or the template's end-of-turn token: generation stops there too; the answer is before it
            stops.add(answer[ends[0]])
            answer = answer[: ends[0]]
        if i % rt.world_size == rt.rank:
            prompts.append(encoded.input_ids[i][:start].tolist())
            references.append(tokenizer.decode(answer, skip_special_tokens=True))
    per_rank = -(-count // rt.world_size)
    return Prompts(prompts, references, sorted(stops), -(-per_rank // spec.batch_size))


def normalised(text: str) -> str:
    return " ".join(text.split())


@torch.no_grad()
def generation_metrics(model: torch.nn.Module, prompts: Prompts, spec: GenerationEvalSpec, tokenizer, *,
                       device: torch.device, autocast: Callable, synced: bool) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prompts.stop_ids[0]
    sums = torch.zeros(3, dtype=torch.float64)  # exact matches, ROUGE-L F1, answers
    for b in range(prompts.batches):
        chunk = list(range(b * spec.batch_size, min((b + 1) * spec.batch_size, len(prompts.prompts))))
        rows = [prompts.prompts[i] for i in chunk] or [prompts.prompts[0] if prompts.prompts else [pad]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, tokens in enumerate(rows):  # left-padded: every answer starts right after its prompt
            ids[row, width - len(tokens):] = torch.tensor(tokens)
            mask[row, width - len(tokens):] = 1
        # eager: compiled blocks (compile: regional) would recompile per layer and per length for the KV cache
        with autocast(), torch.compiler.set_stance("force_eager"):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=spec.max_new_tokens, eos_token_id=prompts.stop_ids, pad_token_id=pad,
                                 synced_gpus=synced, use_cache=True)
        for row, i in enumerate(chunk):
            answer = tokenizer.decode(out[row, width:].tolist(), skip_special_tokens=True)
            reference = prompts.references[i]
            sums[0] += float(normalised(answer) == normalised(reference))
            sums[1] += scorer.score(reference, answer)["rougeL"].fmeasure
            sums[2] += 1
    model.train(was_training)
    total = all_reduce(sums.to(device)).cpu()
    answered = max(1.0, float(total[2]))
    return {"eval_exact_match": float(total[0]) / answered, "eval_rouge_l": float(total[1]) / answered}
