"""How long a checkpoint stalls training: the old synchronous torch.save vs the CPU snapshot.

Builds a roberta-base-sized classifier (random init; `--tiny` for a CPU-sized one), takes a few
AdamW steps so the optimizer holds its full state, then times, on the training thread:
- `sync_save`: torch.save of model + optimizer to local disk, what the trainer did before;
- `snapshot`: `kubetrain_trainer.host_copies.snapshot_to_cpu` of the same state, the stall now
  (serialization and upload then run in the background), after `reserve_pinned_memory` at startup
  as the trainer does (reported apart: it is startup time, not a stall).
Prints one JSON line.

    python bench/checkpoint_stall.py [--tiny] [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import RobertaConfig, RobertaForSequenceClassification

from kubetrain_trainer.host_copies import reserve_pinned_memory, snapshot_to_cpu

ROBERTA_BASE = dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1)
TINY = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=130, type_vocab_size=1)


def state_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(state_bytes(v) for v in obj)
    return 0


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny model (CPU, tests)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=None, help="where sync_save writes (default: a temp dir)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = RobertaForSequenceClassification(RobertaConfig(**(TINY if args.tiny else ROBERTA_BASE), num_labels=2)).to(device)
    reserved = reserve_pinned_memory(model)  # what the trainer does at startup
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(5, 900, (8, 64), device=device)
    for _ in range(3):  # populate exp_avg / exp_avg_sq
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=ids, labels=torch.zeros(8, dtype=torch.long, device=device)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def state():
        return {"model.pt": model.state_dict(), "optimizer.pt": optimizer.state_dict()}

    out = args.out or Path(tempfile.mkdtemp(prefix="ckpt-stall-"))
    out.mkdir(parents=True, exist_ok=True)

    def sync_save():
        for name, obj in state().items():
            torch.save(obj, out / name)

    snap = [timed(lambda: snapshot_to_cpu(state())) for _ in range(args.repeats)]  # first: after the reservation
    sync = [timed(sync_save) for _ in range(args.repeats)]
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model": "tiny" if args.tiny else "roberta-base",
        "state_bytes": state_bytes(state()),
        "sync_save_s": sync,
        "reserve_at_startup_s": reserved,
        "snapshot_s": snap,
        "stall_before_s": statistics.median(sync),
        "stall_now_s": statistics.median(snap),
        "first_stall_now_s": snap[0],
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
