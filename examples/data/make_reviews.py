"""Extract the main example's data: 10,568 human-written movie review snippets with human sentiment ratings.

The snippets (Pang & Lee's Rotten Tomatoes sentences) and their ratings (the mean of 20 people's ratings,
-4 to +4) are the ground truth of Hutto & Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment
Analysis of Social Media Text" (ICWSM 2014), shipped inside the vaderSentiment source package on PyPI
(MIT licence): `additional_resources/hutto_ICWSM_2014.tar.gz`. Label 1 where the mean rating is above 0,
0 below; the 37 rated exactly 0 are left out. A seeded shuffle, then the first --eval rows are the eval split.

    pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d /tmp/vader
    python examples/data/make_reviews.py /tmp/vader/vaderSentiment-3.3.2.tar.gz examples/data
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tarfile
from pathlib import Path

INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
SNIPPETS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def read_snippets(sdist: Path) -> list[dict]:
    """(id, mean rating, text) rows, tab-separated, from the archive inside the archive; nothing is extracted."""
    with tarfile.open(sdist) as outer:
        inner_bytes = outer.extractfile(INNER).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        text = inner.extractfile(SNIPPETS).read().decode("utf-8")
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        _, rating, snippet = line.split("\t")
        score = float(rating)
        if score != 0:
            rows.append({"text": snippet.strip(), "label": int(score > 0), "rating": round(score, 3), "source_line": number})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sdist", type=Path, help="vaderSentiment-3.3.2.tar.gz, from PyPI")
    p.add_argument("out", type=Path)
    p.add_argument("--eval", type=int, default=1000)
    p.add_argument("--seed", type=int, default=7)
    a = p.parse_args()
    rows = read_snippets(a.sdist)
    random.Random(a.seed).shuffle(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("reviews-eval.jsonl", rows[: a.eval]), ("reviews-train.jsonl", rows[a.eval :])):
        with open(a.out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        print(f"{a.out / name}: {len(part)} rows, {sum(r['label'] for r in part)} positive")


if __name__ == "__main__":
    main()
