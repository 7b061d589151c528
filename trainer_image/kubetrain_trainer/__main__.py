"""Trainer entry point, run by torchrun in each worker: python -m kubetrain_trainer --config job.yaml"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from kubetrain.api import EXIT_INVALID_SPEC, SpecError, checkpoint_prefix, load_training_job


def resolve_local_paths(job, base: Path):
    """Relative local data/model paths in the YAML resolve against `base` (the YAML's directory locally)."""

    def fix(value: str | None) -> str | None:
        if value is None or "://" in value or os.path.isabs(value):
            return value
        candidate = base / value
        return str(candidate) if candidate.exists() else value  # else: maybe a hub id

    spec = job.spec
    data = spec.data.model_copy(update={"train": fix(spec.data.train), "eval": fix(spec.data.eval)})
    model = spec.model.model_copy(update={"name": fix(spec.model.name), "tokenizer": fix(spec.model.tokenizer)})
    checkpoint = spec.checkpoint
    if "://" not in checkpoint.uri and not os.path.isabs(checkpoint.uri):
        checkpoint = checkpoint.model_copy(update={"uri": str(base / checkpoint.uri)})
    return job.model_copy(update={"spec": spec.model_copy(update={"data": data, "model": model, "checkpoint": checkpoint})})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kubetrain_trainer", description=__doc__)
    p.add_argument("--config", required=True, help="TrainingJob YAML (the operator mounts it from a ConfigMap)")
    p.add_argument("--checkpoint-uri", help="override spec.checkpoint.uri (local runs)")
    p.add_argument("--metrics-port", type=int, help="override spec.metrics.port; 0 disables the exporter")
    p.add_argument("--base-dir", default=os.environ.get("KUBETRAIN_BASE_DIR"),
                   help="relative paths in the YAML resolve here (default: the YAML's directory; pods: the image's examples)")
    p.add_argument("--work-dir", default=os.environ.get("KUBETRAIN_WORK_DIR", "/tmp/kubetrain"), help="local scratch")
    return p.parse_args(argv)


@record  # torchrun then knows the root cause ("FileNotFoundError: ...") and the launcher reports it
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    try:
        job = load_training_job(args.config)
    except SpecError as err:
        print(f"invalid TrainingJob:\n{err}", file=sys.stderr)
        return EXIT_INVALID_SPEC
    job = resolve_local_paths(job, Path(args.base_dir or Path(args.config).resolve().parent))
    uri = args.checkpoint_uri or job.spec.checkpoint.uri
    port = job.spec.metrics.port if args.metrics_port is None else args.metrics_port

    from .build import RunOptions, build_run  # torch and transformers load only for a valid job
    from .loop import train

    opts = RunOptions(
        work_dir=Path(args.work_dir) / job.metadata.namespace / job.metadata.name,
        checkpoint_prefix_uri=checkpoint_prefix(uri, job.metadata.namespace, job.metadata.name),
        metrics_port=port or None,
        metrics_addr=os.environ.get("KUBETRAIN_METRICS_ADDR", "0.0.0.0"),
    )
    try:
        return train(build_run(job, opts))
    finally:
        from .distributed import shutdown

        shutdown()


if __name__ == "__main__":
    sys.exit(main())
