"""The `kubetrain` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .api import EXIT_INVALID_SPEC, EXIT_PERMANENT, SpecError, load_training_job
from .inputs import missing_local_inputs


def _load(path: str):
    try:
        return load_training_job(path)
    except SpecError as err:
        print(f"invalid TrainingJob {path}:\n{err}", file=sys.stderr)
        return None


def _missing_inputs(job, path: str, base_dir: str | None) -> bool:
    """Print what is missing of the job's local inputs (data files, model directories); True if anything is."""
    missing = missing_local_inputs(job, Path(base_dir or Path(path).resolve().parent))
    for line in missing:
        print(f"{path}: {line}", file=sys.stderr)
    return bool(missing)


def cmd_run(args: argparse.Namespace) -> int:
    if not args.local:
        print("kubetrain run needs --local (in a cluster: kubectl apply -f the same YAML)", file=sys.stderr)
        return EXIT_INVALID_SPEC
    job = _load(args.file)
    if job is None:
        return EXIT_INVALID_SPEC
    if _missing_inputs(job, args.file, None):
        return EXIT_PERMANENT
    from .local import run_local

    trainer_args = []
    if args.checkpoint_uri:
        trainer_args += ["--checkpoint-uri", args.checkpoint_uri]
    if args.metrics_port is not None:
        trainer_args += ["--metrics-port", str(args.metrics_port)]
    if args.work_dir:
        trainer_args += ["--work-dir", args.work_dir]
    return run_local(job, Path(args.file).resolve(), trainer_args)


def cmd_validate(args: argparse.Namespace) -> int:
    job = _load(args.file)
    if job is None:
        return EXIT_INVALID_SPEC
    if not args.schema_only and _missing_inputs(job, args.file, args.base_dir):
        return EXIT_PERMANENT
    print(f"{args.file}: valid TrainingJob {job.metadata.namespace}/{job.metadata.name}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A stored checkpoint as a servable model (the trainer's export, run here)."""
    if _load(args.job) is None:
        return EXIT_INVALID_SPEC
    try:
        from kubetrain_trainer.export_checkpoint import export_checkpoint
        from kubetrain_trainer.failures import describe
    except ImportError as err:
        print(f"kubetrain export needs the trainer: pip install 'kubetrain[trainer]' ({err})", file=sys.stderr)
        return EXIT_PERMANENT
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    formats = args.format or ["hf"]
    if "onnx" in formats and "hf" not in formats:
        formats = ["hf", *formats]
    try:
        exported = export_checkpoint(args.checkpoint, Path(args.job), args.to, formats, args.merge_lora)
    except Exception as err:  # noqa: BLE001 - one line naming what failed; the traceback helps nobody here
        print(f"kubetrain export: {describe(err).message}", file=sys.stderr)
        return EXIT_PERMANENT
    print(f"exported step {exported.step} of {args.checkpoint} to {exported.uri} ({', '.join(exported.formats)})")
    return 0


def cmd_dev_cluster(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kubetrain_devcluster.cluster import run_dev_cluster

    return run_dev_cluster(Path(args.state_dir), args.nodes, args.image_root)


def cmd_crd(_args: argparse.Namespace) -> int:
    from .crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kubetrain", description="Kubernetes training operator for NLP fine-tuning")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a TrainingJob")
    run.add_argument("file", help="TrainingJob YAML")
    run.add_argument("--local", action="store_true", help="as local torchrun processes (nodes x procsPerNode)")
    run.add_argument("--checkpoint-uri", help="override spec.checkpoint.uri (a local dir or s3://)")
    run.add_argument("--metrics-port", type=int, help="override spec.metrics.port; 0 disables /metrics")
    run.add_argument("--work-dir", help="local scratch directory (default /tmp/kubetrain)")
    run.set_defaults(func=cmd_run)
    val = sub.add_parser("validate", help="check a TrainingJob YAML against the schema")
    val.add_argument("file")
    val.add_argument("--base-dir", help="where relative data and model paths resolve (default: the YAML's directory; "
                     "in a pod: the trainer image's examples directory)")
    val.add_argument("--schema-only", action="store_true", help="check the schema only, not that local inputs exist")
    val.set_defaults(func=cmd_validate)
    exp = sub.add_parser("export", help="write a checkpoint as a Hugging Face model directory (and ONNX)")
    exp.add_argument("checkpoint", help="a checkpoint directory: <checkpoint.uri>/<ns>/<job>/step-NNNNNNNNN")
    exp.add_argument("--job", required=True, help="the TrainingJob YAML that trained it (spec.model, data, labels)")
    exp.add_argument("--to", required=True, help="where the model goes: a local directory or s3://bucket/prefix")
    exp.add_argument("--format", action="append", choices=["hf", "onnx"], help="hf (default) and/or onnx; repeatable")
    exp.add_argument("--merge-lora", action="store_true", help="with LoRA: the merged full model, not the adapter")
    exp.set_defaults(func=cmd_export)
    crd = sub.add_parser("crd", help="print the TrainingJob CRD")
    crd.set_defaults(func=cmd_crd)
    dev = sub.add_parser("dev-cluster", help="run an API server, pod executor, operator and S3 on this machine")
    try:  # a separate distribution (devcluster/), installed by scripts/setup-venv
        from kubetrain_devcluster.cluster import add_arguments
    except ImportError:
        dev.set_defaults(func=lambda _args: sys.exit("kubetrain dev-cluster needs the kubetrain-devcluster package: "
                                                     "pip install -e devcluster/ (scripts/setup-venv does)"))
    else:
        add_arguments(dev)
        dev.set_defaults(func=cmd_dev_cluster)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
