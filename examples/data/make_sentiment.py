"""Generate the synthetic sentiment corpus the examples and tests train on (no dataset downloads).

Each review is a templated sentence about a product with positive or negative evaluative words and
neutral filler, with lognormal lengths (median ~20 words, long tail), so token-budget batching has
real length skew to work with. The chat files hold the same reviews as conversations (the user asks,
the assistant answers with the sentiment), for instruction tuning. Deterministic for a given seed.

    python examples/data/make_sentiment.py examples/data --train 2000 --eval 400
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

POSITIVE = ["great", "excellent", "wonderful", "reliable", "delightful", "superb", "sturdy", "brilliant", "fast", "comfortable"]
NEGATIVE = ["terrible", "awful", "broken", "flimsy", "disappointing", "useless", "slow", "noisy", "faulty", "horrible"]
SUBJECTS = ["the battery", "this blender", "the screen", "my new phone", "the headphones", "this kettle", "the keyboard", "the tent", "the camera", "this chair"]
FILLER = ["honestly", "after a week", "for the price", "out of the box", "in daily use", "according to my family",
          "compared to the old one", "during the holidays", "at work", "on the first day", "as expected", "overall"]
TEMPLATES = ["{s} is {w}", "{s} turned out {w}", "I found {s} {w}", "{s} feels {w}", "what a {w} purchase, {s}"]


def review(rng: random.Random, label: int) -> str:
    words = POSITIVE if label == 1 else NEGATIVE
    n_clauses = max(1, min(12, round(rng.lognormvariate(0.8, 0.6))))
    clauses = [rng.choice(TEMPLATES).format(s=rng.choice(SUBJECTS), w=rng.choice(words)) for _ in range(n_clauses)]
    parts = []
    for clause in clauses:
        if rng.random() < 0.5:
            clause = f"{rng.choice(FILLER)} {clause}"
        parts.append(clause)
    return (", ".join(parts) + ".").capitalize()


def make_split(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": review(rng, label), "label": label} for label in (rng.randint(0, 1) for _ in range(n))]


def chat_rows(rows: list[dict]) -> list[dict]:
    """The same reviews as instruction-tuning conversations: the assistant answers with the sentiment."""
    return [{"messages": [{"role": "user", "content": f"Is this review positive or negative?\n{r['text']}"},
                          {"role": "assistant", "content": "positive" if r["label"] == 1 else "negative"}]}
            for r in rows]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--eval", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    train, evals = make_split(a.train, a.seed), make_split(a.eval, a.seed + 1)
    write_jsonl(train, a.out_dir / "sentiment-train.jsonl")
    write_jsonl(evals, a.out_dir / "sentiment-eval.jsonl")
    write_jsonl(chat_rows(train), a.out_dir / "sentiment-chat-train.jsonl")
    write_jsonl(chat_rows(evals), a.out_dir / "sentiment-chat-eval.jsonl")


if __name__ == "__main__":
    main()
