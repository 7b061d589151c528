"""Checkpoint stalls inside a real training run: roberta-base-sized, bf16, a checkpoint every 50 steps.

Trains a WordPiece tokenizer on the example corpus, writes a TrainingJob, runs it with
`kubetrain run --local` (1 node), then prints each checkpoint's `stall_seconds` from its manifest.

    python bench/checkpoint_stall_in_loop.py [--work /tmp/gpurun] [--steps 200] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from kubetrain_testkit import tiny  # tokenizer training, job documents

ROBERTA_BASE = {"model_type": "roberta", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                "intermediate_size": 3072, "max_position_embeddings": 514, "type_vocab_size": 1}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/kubetrain-stall-run"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=50, help="checkpoint.everySteps")
    p.add_argument("--tiny", action="store_true", help="a tiny BERT in fp32 (CPU, tests)")
    args = p.parse_args(argv)
    data = REPO / "examples" / "data"
    tok = tiny.train_tokenizer(args.work / "tok", data / "sentiment-train.jsonl", vocab_size=300 if args.tiny else 8000)
    doc = tiny.job_doc("stall", data / "sentiment-train.jsonl", data / "sentiment-eval.jsonl", tok, str(args.work / "ckpt"))
    if not args.tiny:
        doc["spec"]["model"]["config"] = ROBERTA_BASE
        doc["spec"]["data"].update(maxLength=128, maxTokensPerBatch=8192)
    doc["spec"]["training"].update(maxSteps=args.steps, precision="fp32" if args.tiny else "bf16",
                                   logEverySteps=args.every, learningRate=5e-5)
    doc["spec"]["checkpoint"].update(everySteps=args.every, keep=1000)
    job = tiny.write_job(args.work / "job.yaml", doc)
    code = subprocess.call([sys.executable, "-m", "kubetrain.cli", "run", "--local", str(job),
                            "--work-dir", str(args.work / "w"), "--metrics-port", "0"])
    rows = []
    for manifest in sorted((args.work / "ckpt").rglob("manifest.json")):
        m = json.loads(manifest.read_text())
        rows.append({"step": m["step"], "reason": m["meta"]["reason"], "stall_s": m["meta"]["stall_seconds"],
                     "bytes": sum(f["size"] for f in m["files"].values())})
    result = {"exit": code, "checkpoints": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
