"""What a tokenized split costs in each rank's memory: rows stored as Python lists (how Encoded held them
until 2026-12-02, plus the padded batcher's whole-split [samples, longest] int64 array) against `data.Ragged`.

    python bench/data_memory.py --rows 100000 --mean 200 --cap 1024
"""

from __future__ import annotations

import argparse
import json
import tracemalloc

import numpy as np

from kubetrain_trainer.batching import DeviceBatcher
from kubetrain_trainer.data import Encoded


def measure(build) -> float:
    tracemalloc.start()
    kept = build()
    size = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del kept
    return size / 2**20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--mean", type=int, default=200)
    p.add_argument("--cap", type=int, default=1024)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(a.mean), 0.8, a.rows).astype(int), 2, a.cap)
    lists = [rng.integers(300, 50_000, n).tolist() for n in lengths]  # what a tokenizer returns
    tokens = int(lengths.sum())
    as_lists = measure(lambda: [np.asarray(r).tolist() for r in lists])  # fresh int objects, as a tokenizer makes
    padded = a.rows * int(lengths.max()) * 8 / 2**20  # the batcher's former whole-split int64 array
    ragged = measure(lambda: Encoded(lists, None, None))
    import torch

    batcher = measure(lambda: DeviceBatcher(Encoded(lists, None, None), 0, torch.device("cpu")))
    print(json.dumps({"rows": a.rows, "tokens": tokens, "longest": int(lengths.max()),
                      "lists_mib": round(as_lists, 1), "former_padded_split_mib": round(padded, 1),
                      "ragged_mib": round(ragged, 1), "ragged_with_batcher_mib": round(batcher, 1),
                      "bytes_per_token_lists": round(as_lists * 2**20 / tokens, 1),
                      "bytes_per_token_ragged": round(ragged * 2**20 / tokens, 2)}, indent=1))


if __name__ == "__main__":
    main()
