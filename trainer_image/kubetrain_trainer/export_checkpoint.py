"""`kubetrain export`: any stored checkpoint of a job, written as its trained model would have been.

The checkpoint is downloaded and verified against its manifest (as a resume does), its weights are
loaded into the model that `spec.model` of the job's YAML builds (a sharded fsdp checkpoint is read by
torch.distributed.checkpoint into full tensors, in one process), and export.export_model writes it.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

import torch

from kubetrain.api import TrainingJob, load_training_job
from kubetrain.inputs import resolve_local_paths

from . import data as D
from .checkpoint_store import CheckpointStore
from .export import ExportError, Exported, Provenance, export_model
from .model import build_model, load_tokenizer, trainable_state_dict
from .sharded_checkpoint import SHARDS_DIR
from .storage import open_storage
from .tasks import Task, task_for

log = logging.getLogger("kubetrain.export")

STEP_DIR = re.compile(r"^(?P<parent>.+)/step-(?P<step>\d+)/?$")


def export_checkpoint(checkpoint_uri: str, job_path: Path, to: str, formats: list[str], merge_lora: bool,
                      work_dir: Path | None = None) -> Exported:
    m = STEP_DIR.match(checkpoint_uri)
    if not m:
        raise ExportError(f"{checkpoint_uri}: not a checkpoint directory (<checkpoint.uri>/<ns>/<job>/step-NNNNNNNNN)")
    job = resolve_local_paths(load_training_job(job_path), job_path.resolve().parent)
    spec = job.spec
    task = task_for(spec.model.task)
    s3 = {"endpoint": spec.checkpoint.endpoint, "region": spec.checkpoint.region}
    storage, prefix = open_storage(m["parent"], **s3)
    store = CheckpointStore(storage, prefix, keep=1000)
    info = next((c for c in store.list_complete() if c.step == int(m["step"])), None)
    if info is None:
        raise ExportError(f"{checkpoint_uri}: no complete checkpoint there (no manifest.json)")
    work = Path(work_dir or tempfile.mkdtemp(prefix="kubetrain-export-"))
    files = store.download(info, work / "checkpoint")
    tokenizer = load_tokenizer(spec.model, work / "cache", **s3)
    labels = info.meta.get("labels")
    rows = None
    if "labels" not in info.meta:  # a checkpoint from before labels were recorded: they follow from the data
        rows = D.read_rows(spec.data.train, spec.data.format, **s3)
        labels = task.label_vocabulary(rows, spec.data, spec.model, spec.data.train)

    state, progress = stored_weights(job, task, tokenizer, files, work, **s3)

    split = spec.data.eval or spec.data.train
    sample_rows = D.read_rows(split, spec.data.format, **s3)[:16] if rows is None or spec.data.eval else rows[:16]
    samples = task.encode(sample_rows, tokenizer, spec.data, split, labels).input_ids
    provenance = Provenance(info.step, dict(progress.get("last_eval") or {}), info.uri,
                            {"train": spec.data.train, **({"eval": spec.data.eval} if spec.data.eval else {})})
    return export_model(job, task, tokenizer, state, labels, provenance, samples, work, whole=False, uri=to,
                        formats=formats, merge_lora=merge_lora)


def stored_weights(job: TrainingJob, task: Task, tokenizer, files: dict[str, Path], work: Path,
                   **s3) -> tuple[dict[str, torch.Tensor], dict]:
    """The trained weights (LoRA: its tensors) of a downloaded checkpoint as full CPU tensors, and its state.json."""
    spec = job.spec
    lora = spec.model.lora is not None
    if SHARDS_DIR + "/.metadata" in files:
        # only the names, shapes and dtypes are needed to read the shards into: a meta-device model, no weights loaded
        model = build_model(spec.model.model_copy(update={"quantization": "none"}), task, tokenizer, work / "cache",
                            precision=spec.training.precision, weights=False, **s3)
        state = {name: torch.empty_like(t, device="cpu") for name, t in trainable_state_dict(model, lora).items()}
        import torch.distributed.checkpoint as dcp

        dcp.load({SHARDS_DIR: {"model": state}}, storage_reader=dcp.FileSystemReader(files[SHARDS_DIR + "/.metadata"].parent),
                 no_dist=True)  # this process alone reads every shard, whatever the job's process group
        del model
    else:
        state = torch.load(files["model.pt"], map_location="cpu", weights_only=True)
    progress = json.loads(files["state.json"].read_text()) if "state.json" in files else {}
    return state, progress
