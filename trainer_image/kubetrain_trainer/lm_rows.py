"""Causal-LM rows as token ids plus the tokens the loss counts: plain text, prompt + completion, or a chat.

A prompt-completion row is tokenized as one text (the prompt, then the completion, then EOS) and the
tokens that begin inside the completion are trained (where both fields are message lists, the
conversation is rendered with the chat template and what the completion adds is trained); a chat is rendered with its chat template and the
tokens of each assistant turn (what the template renders for it, its end-of-turn marker included) are
trained. Both find the trained tokens through the tokenizer's character offsets, so the ids are exactly
those of the whole text: there is no seam where a prompt and its answer were tokenized apart.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from kubetrain.api import DataSpec

from .data import DataError, Encoded, require_fields
from .failures import one_line

log = logging.getLogger("kubetrain.data")

Span = tuple[int, int]  # characters [start, end) of a text whose tokens are trained


def resolve_style(rows: Sequence[dict], data: DataSpec) -> str:
    """spec.data.style, with auto read off the first row."""
    if data.style != "auto":
        return data.style
    first = rows[0] if rows else {}
    if data.messages_field in first:
        return "chat"
    if data.prompt_field in first and data.completion_field in first:
        return "prompt-completion"
    return "text"


def encode_lm(rows: Sequence[dict], tokenizer, data: DataSpec, uri: str) -> Encoded:
    style = resolve_style(rows, data)
    if style == "text":
        require_fields(rows, {"textField": data.text_field}, uri, text=("textField",))
        texts, spans = [str(r[data.text_field]) for r in rows], None
    elif style == "prompt-completion" and rows and isinstance(rows[0].get(data.prompt_field), list):
        return _encode_chat(rows, tokenizer, data, uri, conversational=True)
    elif style == "prompt-completion":
        require_fields(rows, {"promptField": data.prompt_field, "completionField": data.completion_field}, uri,
                       text=("promptField", "completionField"))
        texts = [r[data.prompt_field] + r[data.completion_field] for r in rows]
        spans = [[(len(r[data.prompt_field]), len(t))] for r, t in zip(rows, texts)]
    else:
        return _encode_chat(rows, tokenizer, data, uri)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if spans is None or data.train_on == "all":  # every token but a document's first
        ids = [(t + eos)[: data.max_length] for t in tokenizer(texts, add_special_tokens=True)["input_ids"]]
        return Encoded(ids, None, None)
    out = _tokenize_with_offsets(tokenizer, texts, add_special_tokens=True)
    ids = [(t + eos)[: data.max_length] for t in out["input_ids"]]
    trained = [np.concatenate([_inside(offsets, s), np.ones(len(eos), dtype=bool)])[: data.max_length]
               for offsets, s in zip(out["offset_mapping"], spans)]
    return _keep_trained(ids, trained, uri, data, "completion")


def _encode_chat(rows: Sequence[dict], tokenizer, data: DataSpec, uri: str, conversational: bool = False) -> Encoded:
    """Chat rows; or, `conversational`, prompt-completion rows whose fields are message lists (the completion's
    rendering is trained)."""
    template = data.chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError(f"spec.data.style {data.style if conversational else 'chat'}: the tokenizer "
                        f"({tokenizer.name_or_path or 'spec.model.tokenizer'}) has no chat template; set "
                        "spec.data.chatTemplate or use a tokenizer that has one")
    fields = ({"promptField": data.prompt_field, "completionField": data.completion_field} if conversational
              else {"messagesField": data.messages_field})
    require_fields(rows, fields, uri)
    texts, spans = [], []
    for n, row in enumerate(rows, start=1):
        where = f"{uri} row {n}"
        if conversational:
            prompt = _messages(row[data.prompt_field], f"{where}: {data.prompt_field}")
            completion = _messages(row[data.completion_field], f"{where}: {data.completion_field}")
            text, answer = render_completion(tokenizer, template, prompt, completion, where)
        else:
            text, answer = render_chat(tokenizer, template, _messages(row[data.messages_field],
                                                                      f"{where}: {data.messages_field}"), where)
        texts.append(text)
        spans.append(answer)
    out = _tokenize_with_offsets(tokenizer, texts, add_special_tokens=False)  # the template writes BOS itself
    ids = [t[: data.max_length] for t in out["input_ids"]]
    if data.train_on == "all":
        return Encoded(ids, None, None)
    trained = [_inside(offsets, s)[: data.max_length] for offsets, s in zip(out["offset_mapping"], spans)]
    return _keep_trained(ids, trained, uri, data, "assistant")


def render_chat(tokenizer, template: str, messages: list[dict], where: str) -> tuple[str, list[Span]]:
    """The conversation as the template renders it, and the characters of each assistant turn: what rendering
    through that turn adds to rendering up to it with the generation prompt (so the prompt is not trained)."""

    text = _render(tokenizer, template, messages, False, where)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, template, messages[:i], True, where)
        through = _render(tokenizer, template, messages[: i + 1], False, where)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(f"{where}: the chat template does not render this conversation turn by turn (what it "
                            f"writes before assistant turn {i} changes with what follows), so its assistant tokens "
                            "cannot be told apart; use a template that does, or spec.data.trainOn all")
        spans.append((len(before), len(through)))
    return text, spans


def render_completion(tokenizer, template: str, prompt: list[dict], completion: list[dict],
                      where: str) -> tuple[str, list[Span]]:
    """A conversational prompt-completion row: the whole conversation, and what its completion adds to the
    prompt rendered with the generation prompt."""
    text, _ = render_chat(tokenizer, template, prompt + completion, where)
    before = _render(tokenizer, template, prompt, True, where)
    if not text.startswith(before):
        raise DataError(f"{where}: the chat template renders the prompt differently once the completion follows, "
                        "so the completion's tokens cannot be told apart; use a template that does not, or "
                        "spec.data.trainOn all")
    return text, [(len(before), len(text))]


def _render(tokenizer, template: str, turns: list[dict], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as err:  # noqa: BLE001 - jinja's errors (TemplateError, sandbox SecurityError) vary
        raise DataError(f"{where}: the chat template failed: {one_line(err, 200)}") from None


def _messages(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}[{i}]: expected {{\"role\": text, \"content\": text}}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _tokenize_with_offsets(tokenizer, texts: list[str], add_special_tokens: bool):
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("spec.data: prompt-completion and chat rows need a fast (Rust) tokenizer, which tells where "
                        "each token came from; this one is slow (no tokenizer.json)")
    return tokenizer(texts, add_special_tokens=add_special_tokens, return_offsets_mapping=True)


def _inside(offsets: Sequence[tuple[int, int]], spans: list[Span]) -> np.ndarray:
    """Tokens that begin inside a span (special tokens the tokenizer adds cover no characters: never)."""
    starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
    ends = np.fromiter((o[1] for o in offsets), dtype=np.int64, count=len(offsets))
    mask = np.zeros(len(offsets), dtype=bool)
    for lo, hi in spans:
        mask |= (starts >= lo) & (starts < hi) & (ends > starts)
    return mask


def _keep_trained(ids: list[list[int]], trained: list[np.ndarray], uri: str, data: DataSpec, what: str) -> Encoded:
    """A sample's first token is never a target (nothing predicts it); samples with no trained token (their
    answer cut off by maxLength) add nothing but cost: left out, with a warning that says how many."""
    for mask in trained:
        mask[:1] = False
    keep = [i for i, mask in enumerate(trained) if mask.any()]
    if not keep:
        raise DataError(f"{uri}: no row has a {what} token within spec.data.maxLength {data.max_length}")
    if len(keep) < len(ids):
        first = next(i for i, mask in enumerate(trained) if not mask.any())
        log.warning("%s: %d of %d rows have no %s token within spec.data.maxLength %d (the first: row %d); left out",
                    uri, len(ids) - len(keep), len(ids), what, data.max_length, first + 1)
    return Encoded([ids[i] for i in keep], None, None, [trained[i] for i in keep])
