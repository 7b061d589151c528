"""A synthetic corpus for benchmarks: pseudo-words a WordPiece tokenizer learns one token each, rows with
lognormal word counts, labels learnable from marker words (bench/hf_compare.py, bench/large_models.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def words(n: int) -> list[str]:
    """n distinct pronounceable pseudo-words (the tokenizer learns each as one token)."""
    onsets, vowels = "bdfgklmnprstvz", "aeiou"
    syllables = [c + v for c in onsets for v in vowels]
    out = [a + b for a in syllables for b in syllables] + [a + b + c for a in syllables for b in syllables for c in syllables]
    return out[:n]


def make_rows(n: int, vocab: list[str], seed: int, median_words: float = 38.0, sigma: float = 0.75) -> list[dict]:
    """Rows with lognormal word counts; a row's label decides which marker words it carries."""
    rng = np.random.default_rng(seed)
    markers = (vocab[:50], vocab[50:100])
    neutral = vocab[100:]
    counts = np.maximum(1, np.rint(rng.lognormal(math.log(median_words), sigma, n))).astype(int)
    rows = []
    for count in counts:
        label = int(rng.integers(2))
        picks = rng.integers(len(neutral), size=count)
        marked = rng.random(count) < 0.1
        text = [markers[label][rng.integers(50)] if m else neutral[p] for p, m in zip(picks, marked, strict=True)]
        rows.append({"text": " ".join(text), "label": label})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
