"""The worker's command line and the TrainingJob it names, checked before anything heavy is imported.

The launcher runs the same check before torchrun starts (launch.preflight), so a typo in a data path
fails the pod at once with one line, instead of inside every worker's torch elastic traceback.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from kubetrain.api import TrainingJob, load_training_job
from kubetrain.inputs import missing_local_inputs, resolve_local_paths

from .failures import DataError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kubetrain_trainer", description="Trainer entry point, run by torchrun "
                                "in each worker: python -m kubetrain_trainer --config job.yaml")
    p.add_argument("--config", required=True, help="TrainingJob YAML (the operator mounts it from a ConfigMap)")
    p.add_argument("--checkpoint-uri", help="override spec.checkpoint.uri (local runs)")
    p.add_argument("--metrics-port", type=int, help="override spec.metrics.port; 0 disables the exporter")
    p.add_argument("--base-dir", default=os.environ.get("KUBETRAIN_BASE_DIR"),
                   help="relative paths in the YAML resolve here (default: the YAML's directory; pods: the image's examples)")
    p.add_argument("--work-dir", default=os.environ.get("KUBETRAIN_WORK_DIR", "/tmp/kubetrain"), help="local scratch")
    return p.parse_args(argv)


def load_job(args: argparse.Namespace) -> TrainingJob:
    """The job with its relative paths resolved; SpecError if invalid, DataError naming a missing local input."""
    job = load_training_job(args.config)
    base = Path(args.base_dir or Path(args.config).resolve().parent)
    missing = missing_local_inputs(job, base)
    if missing:
        raise DataError("; ".join(missing))
    return resolve_local_paths(job, base)
