"""Tiny training jobs for tests: a tokenizer trained on the fly, random-init models, real data files.

Nothing is downloaded: the corpus comes from examples/data/make_sentiment.py, the tokenizer is a
WordPiece model trained on it, and the models are built from small transformers configs.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from collections.abc import Callable
from typing import Any

import yaml

from . import REPO as ROOT

TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 128}
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128}


def sentiment_module():
    spec = importlib.util.spec_from_file_location("make_sentiment", ROOT / "examples/data/make_sentiment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_corpus(out: Path, n_train: int = 400, n_eval: int = 80) -> tuple[Path, Path]:
    gen = sentiment_module()
    train, evals = out / "train.jsonl", out / "eval.jsonl"
    gen.write_jsonl(gen.make_split(n_train, seed=1), train)
    gen.write_jsonl(gen.make_split(n_eval, seed=2), evals)
    return train, evals


def train_tokenizer(out: Path, corpus: Path, vocab_size: int = 300) -> Path:
    """A BERT-style WordPiece tokenizer trained on the corpus, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EOS]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="[EOS]")
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def train_chat_tokenizer(out: Path, texts: list[str], vocab_size: int = 400, chat_template: str | None = CHATML) -> Path:
    """A byte-level BPE tokenizer (GPT-2/Qwen style: decoding gives back the text exactly) with ChatML's special
    tokens and, unless None, a chat template; saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = chat_template
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def job_doc(name: str, train: Path, evals: Path | None, tokenizer: Path, checkpoint_uri: str, *,
            task: str = "sequence-classification", **spec_overrides: Any) -> dict:
    doc = {
        "apiVersion": "kubetrain.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": "tests"},
        "spec": {
            "image": "kubetrain-trainer:test",
            "nodes": 1,
            "procsPerNode": 1,
            "model": {"config": TINY_BERT if task == "sequence-classification" else TINY_GPT2,
                      "tokenizer": str(tokenizer), "task": task, "numLabels": 2},
            "data": {"train": str(train), **({"eval": str(evals)} if evals else {}), "maxLength": 64,
                     "maxTokensPerBatch": 512},
            "training": {"maxSteps": 12, "learningRate": 1e-3, "warmupRatio": 0.1, "precision": "fp32",
                         "logEverySteps": 1, "seed": 7},
            "checkpoint": {"uri": checkpoint_uri, "everySteps": 4, "keep": 10},
            "metrics": {"port": 9400},
        },
    }
    for path, value in spec_overrides.items():
        merge(doc["spec"], path.split("__"), value)
    return doc


def set_path(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Mutator: set (or with value=DELETE, remove) the field at a dotted path; `[i]` indexes."""

    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.replace("[", ".[").split(".")
        target: Any = doc
        for part in parents:
            target = target[int(part[1:-1])] if part.startswith("[") else target[part]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value

    return mutate




DELETE = object()


def merge(target: dict, path: list[str], value: Any) -> None:
    for key in path[:-1]:
        target = target.setdefault(key, {})
    target[path[-1]] = copy.deepcopy(value)


def write_job(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class LocalRun:
    """`kubetrain run --local` as a child process, its output collected line by line."""

    def __init__(self, job: Path, *, env: dict[str, str], work_dir: Path, metrics_port: int = 0):
        import os
        import subprocess
        import sys
        import threading

        self.lines: list[str] = []
        self._changed = threading.Condition()
        cmd = [sys.executable, "-m", "kubetrain.cli", "run", "--local", str(job), "--work-dir", str(work_dir),
               "--metrics-port", str(metrics_port)]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 180):
        """The first match of a regex in the output, waiting for it; fails if the process ends first."""
        import re
        import time

        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if m := regex.search(line):
                        return m
                seen = len(self.lines)
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"exited {self.proc.returncode} before /{pattern}/:\n{self.output[-4000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out waiting for /{pattern}/:\n{self.output[-4000:]}")
                self._changed.wait(timeout=0.5)

    def finish(self, timeout: float = 300) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def matches(self, pattern: str) -> list:
        import re

        return [m for line in self.lines if (m := re.search(pattern, line))]
