"""Where the host's time goes inside the training loop: a py-spy raw (collapsed) profile summed by frame.

Only samples under `--under` (default: the trainer's step function) count, so start-up, compilation and
evaluation do not dilute the picture. Prints each frame's share of those samples, inclusive and self.

    py-spy record -r 100 -d 120 --format raw -o spy.txt -- python bench/lm_compare.py --side kubetrain-regional ...
    python bench/spy_summary.py spy.txt [--under train_step] [--top 40]
"""

from __future__ import annotations

import argparse
import collections
import json
import re


def summarize(lines, under: str, top: int) -> dict:
    inclusive, own, total = collections.Counter(), collections.Counter(), 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        frames = stack.split(";")
        start = next((i for i, f in enumerate(frames) if f.startswith(under + " ")), None)
        if start is None or not count.isdigit():
            continue
        n, total = int(count), total + int(count)
        for frame in {re.sub(r":\d+\)$", ")", f) for f in frames[start:]}:  # per function, all its lines
            inclusive[frame] += n
        own[frames[-1]] += n
    share = lambda c: [(f, round(v / total, 4)) for f, v in c.most_common(top)] if total else []  # noqa: E731
    return {"samples": total, "under": under, "inclusive": share(inclusive), "self": share(own)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("raw")
    p.add_argument("--under", default="train_step")
    p.add_argument("--top", type=int, default=40)
    args = p.parse_args()
    with open(args.raw) as f:
        print(json.dumps(summarize(f, args.under, args.top), indent=1))


if __name__ == "__main__":
    main()
