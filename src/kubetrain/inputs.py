"""A job's local inputs: relative paths resolved against a base directory, and refused when missing.

Relative paths in a TrainingJob resolve against the YAML's directory locally and the image's examples
in a pod. A data file is always a path or a URI, so a missing one (a typo: `data/trian.jsonl`) is an
error naming the field and the path before any process starts; a model or tokenizer name may be a
hub id, so only one that is clearly a path (`./`, `../`, `/`, `~`, or more than one `/`) must exist.
"""

from __future__ import annotations

import os
from pathlib import Path

from .api import TrainingJob

REMOTE = ("s3://", "package://", "file://")


def is_remote(value: str) -> bool:
    return value.startswith(REMOTE) or "://" in value


def looks_like_path(value: str) -> bool:
    return value.startswith(("./", "../", "/", "~")) or value.count("/") > 1


def resolve_local_paths(job: TrainingJob, base: Path) -> TrainingJob:
    """Relative local data/model paths and the checkpoint and output directories, made absolute against `base`."""

    def fix(value: str | None, always: bool = False) -> str | None:
        if value is None or is_remote(value) or os.path.isabs(value):
            return value
        candidate = base / Path(value).expanduser()
        return str(candidate) if always or candidate.exists() else value  # a model name may be a hub id

    spec = job.spec
    data = spec.data.model_copy(update={"train": fix(spec.data.train, always=True), "eval": fix(spec.data.eval, always=True)})
    model = spec.model.model_copy(update={"name": fix(spec.model.name), "tokenizer": fix(spec.model.tokenizer)})
    checkpoint = spec.checkpoint
    if not is_remote(checkpoint.uri) and not os.path.isabs(checkpoint.uri):
        checkpoint = checkpoint.model_copy(update={"uri": str(base / checkpoint.uri)})
    output = spec.output
    if output is not None and not is_remote(output.uri) and not os.path.isabs(output.uri):
        output = output.model_copy(update={"uri": str(base / output.uri)})
    return job.model_copy(update={"spec": spec.model_copy(update={"data": data, "model": model, "checkpoint": checkpoint,
                                                                  "output": output})})


def missing_local_inputs(original: TrainingJob, base: Path) -> list[str]:
    """One line per local input of `original` (as written) that does not exist under `base`."""
    spec = original.spec
    problems = []
    for field, value, is_path in (("spec.data.train", spec.data.train, True), ("spec.data.eval", spec.data.eval, True),
                                  ("spec.model.name", spec.model.name, False),
                                  ("spec.model.tokenizer", spec.model.tokenizer, False)):
        if value is None or is_remote(value) or not (is_path or looks_like_path(value)):
            continue
        path = Path(value).expanduser()
        where = path if path.is_absolute() else base / path
        if not where.exists():
            relative = "" if path.is_absolute() else f" (relative paths resolve against {base})"
            problems.append(f"{field}: {value}: no such file or directory{relative}")
    return problems
