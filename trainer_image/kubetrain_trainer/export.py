"""The trained model out: a Hugging Face model directory anyone can `from_pretrained`, and ONNX.

The directory holds safetensors weights, the config with the label names of the training data
(`id2label`/`label2id`: string labels come back as strings), the tokenizer, a generation config for
LMs and a model card (README.md) saying what trained it. Under LoRA it is the adapter (PEFT's
layout), or with `output.mergeLora` the merged full model. With `onnx` it also holds model.onnx
(logits; dynamic batch and sequence axes), checked against the PyTorch model with onnxruntime on eval
samples, the result in the card.

The model is rebuilt from `spec.model` on the CPU and the trained weights loaded into it, so the same
code exports a live run (any strategy: fsdp's shards are gathered first) and a stored checkpoint
(`kubetrain export`), and a quantized (QLoRA) base is merged into unquantized weights. It is
published like a checkpoint: every file uploaded with retries, `kubetrain-export.json` (sizes and
sha256 of each) written last, so a torn export is never taken for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from kubetrain.api import TrainingJob

from .distributed import seed_everything
from .failures import ModelError
from .checkpoint_store import retry_transient
from .data import Encoded, collate
from .model import build_model, load_trainable_state
from .storage import Storage, join_key, open_storage
from .tasks import Task

log = logging.getLogger("kubetrain.export")

EXPORT_MANIFEST = "kubetrain-export.json"
ONNX_FILE = "model.onnx"
ONNX_TOLERANCE = 1e-4  # max |logits(onnxruntime) - logits(torch)| in fp32
PARITY_SAMPLES = 16


class ExportError(ModelError):
    """The model cannot be written in a format asked for (the message names the format and architecture)."""


@dataclass
class Exported:
    """What landed at `uri`: the manifest's content."""

    uri: str
    step: int
    formats: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    onnx_max_abs_diff: float | None = None
    files: dict[str, dict] = field(default_factory=dict)  # name -> {size, sha256}
    local: Path | None = None  # the directory it was written from (for MLflow's artifact)


@dataclass(frozen=True)
class Provenance:
    """What the model card says the model came from."""

    step: int
    metrics: dict[str, float]
    checkpoint: str | None
    data: dict[str, str]  # split -> where it was read and a fingerprint of its tokens


def token_fingerprint(input_ids) -> str:
    """sha256 (16 hex) of a tokenized split (rows of token ids): the same data and tokenizer give the same
    fingerprint (each row's length, then its ids, as 4-byte little-endian integers)."""
    digest = hashlib.sha256()
    for ids in input_ids:
        digest.update(len(ids).to_bytes(4, "little"))
        digest.update(np.asarray(ids, dtype="<i4").tobytes())
    return digest.hexdigest()[:16]


def servable_model(job: TrainingJob, task: Task, tokenizer, state: dict[str, torch.Tensor], labels: dict[str, int] | None,
                   cache_dir: Path, *, whole: bool, **s3) -> torch.nn.Module:
    """A CPU model of `spec.model` holding `state`, its config naming the labels.

    whole: `state` is every weight (base included): the model is built on the meta device and takes the
    tensors as they are. Else `state` is what a checkpoint holds (LoRA: the trained tensors only) and the
    rest is built from spec.model: pretrained weights, or a random init seeded as the trainer seeds it
    (the same init where the trainer built it on the CPU; a GPU's random init differs).
    """
    spec = job.spec
    lora = spec.model.lora is not None
    plain = spec.model.model_copy(update={"quantization": "none"})  # a QLoRA base merges into real weights
    if whole:
        model = build_model(plain, task, tokenizer, cache_dir, precision=spec.training.precision, weights=False, **s3)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise ExportError(f"model export: the trained state does not fit spec.model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    else:
        seed_everything(spec.training.seed)
        model = build_model(plain, task, tokenizer, cache_dir, precision=spec.training.precision, device="cpu", **s3)
        load_trainable_state(model, state, lora)
    inner = model.get_base_model() if lora else model
    if labels is not None:
        inner.config.id2label = {i: label for label, i in sorted(labels.items(), key=lambda kv: kv[1])}
        inner.config.label2id = dict(labels)
    return model


def write_hf_directory(model: torch.nn.Module, tokenizer, dest: Path, *, merge_lora: bool) -> str:
    """save_pretrained of the model (adapter, merged or full) and the tokenizer; returns what was written."""
    dest.mkdir(parents=True, exist_ok=True)
    kind = "full model"
    if hasattr(model, "merge_and_unload"):  # LoRA
        if merge_lora:
            model, kind = model.merge_and_unload(), "merged LoRA model"
        else:
            kind = "LoRA adapter"
    if getattr(model.config, "torch_dtype", None) is None and hasattr(model, "dtype"):
        model.config.torch_dtype = model.dtype
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return kind


class Logits(torch.nn.Module):
    """The exported graph: ids and attention mask in, logits out (no key/value cache)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.extra = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **self.extra).logits


def export_onnx(hf_dir: Path, task: Task, samples: list[list[int]], pad_id: int) -> float:
    """model.onnx next to the weights; returns max |Δlogits| against torch on `samples` (fp32, onnxruntime CPU)."""

    model = task.auto_model().from_pretrained(hf_dir, dtype=torch.float32, trust_remote_code=False).eval()
    model_type = model.config.model_type
    batch = collate(Encoded(samples or [[pad_id, pad_id]], None, None), range(len(samples) or 1), pad_id)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    batch = torch.export.Dim("batch", min=1, max=4096)
    sequence = torch.export.Dim("sequence", min=2, max=max(3, getattr(model.config, "max_position_embeddings", 4096)))
    try:
        with quiet_exporter():
            program = torch.onnx.export(Logits(model).eval(), (ids, mask), dynamo=True, input_names=["input_ids", "attention_mask"],
                                        output_names=["logits"], verbose=False,
                                        dynamic_shapes={"input_ids": {0: batch, 1: sequence},
                                                        "attention_mask": {0: batch, 1: sequence}})
            program.save(str(hf_dir / ONNX_FILE))
    except Exception as err:  # noqa: BLE001 - any exporter failure is one readable line
        raise ExportError(f"spec.output.formats: onnx: {model_type!r} ({type(model).__name__}) cannot be exported to "
                          f"ONNX: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}") from err
    import onnxruntime

    session = onnxruntime.InferenceSession(str(hf_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = Logits(model).eval()(ids, mask).numpy()
    real = mask.numpy().astype(bool)
    if got.ndim == 3:  # per-position logits: compare the real positions only
        got, want = got[real], want[real]
    return float(np.abs(got - want).max())


@contextlib.contextmanager
def quiet_exporter():
    """The exporter's passes log every rewrite, and warn about optional packages (torchvision) and its own
    deprecations: the job's log keeps ours, and errors."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def model_card(job: TrainingJob, kind: str, provenance: Provenance, onnx_diff: float | None) -> str:
    spec = job.spec
    lines = [f"# {job.metadata.name}", "",
             f"A {kind} ({spec.model.task}) fine-tuned by kubetrain from `{spec.model.name or 'a random initialisation'}`, "
             f"step {provenance.step}.", ""]
    if provenance.metrics:
        lines += ["## Evaluation", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(provenance.metrics.items())] + [""]
    lines += ["## Provenance", "", f"- TrainingJob: {job.metadata.namespace}/{job.metadata.name} (uid {job.metadata.uid or '-'})",
              f"- checkpoint: {provenance.checkpoint or '-'}"]
    lines += [f"- {split} data: {where}" for split, where in provenance.data.items()]
    if onnx_diff is not None:
        verdict = "passed" if onnx_diff <= ONNX_TOLERANCE else "FAILED"
        lines += [f"- ONNX: {ONNX_FILE}, onnxruntime parity {verdict}: max |Δlogits| {onnx_diff:.2e} over up to "
                  f"{PARITY_SAMPLES} eval samples (tolerance {ONNX_TOLERANCE:g}, fp32)"]
    if kind == "LoRA adapter":
        lines += ["", "## Loading", "", "A PEFT adapter: load the base model (`spec.model` below), then "
                  "`peft.PeftModel.from_pretrained(base, <this directory>)`; or export with `output.mergeLora: true` "
                  "for a full model."]
    body = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    lines += ["", "## The job's spec", "", "```yaml", yaml.safe_dump(body.get("spec", {}), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def publish(local_dir: Path, uri: str, record: dict, *, attempts: int, endpoint: str | None, region: str | None) -> dict:
    """Upload every file of local_dir under `uri` (retried), then the manifest; returns the file entries."""
    storage, prefix = open_storage(uri, endpoint=endpoint, region=region)
    manifest_key = join_key(prefix, EXPORT_MANIFEST)
    retrying(lambda: storage.delete_keys([manifest_key]), f"delete {storage.uri(manifest_key)}", attempts)
    files = {}
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        name = path.relative_to(local_dir).as_posix()
        with open(path, "rb") as f:
            files[name] = {"size": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
        key = join_key(prefix, name)
        retrying(lambda: storage.put_file(path, key), f"upload to {storage.uri(key)}", attempts)
    body = json.dumps({**record, "files": files}, indent=2, sort_keys=True).encode()
    retrying(lambda: storage.put_bytes(body, manifest_key), f"upload to {storage.uri(manifest_key)}", attempts)
    return files


def retrying(op, what: str, attempts: int):
    """Storage requests retried as a checkpoint's are; exhausted retries are transient (RuntimeError): another
    attempt of the job exports again."""
    return retry_transient(op, "model export", what, attempts=attempts, error=RuntimeError, logger=log)


def read_export(storage: Storage, prefix: str) -> dict | None:
    """The manifest of a finished export under prefix, or None (absent: none, or a torn one)."""
    from .storage import NotFound

    try:
        return json.loads(storage.get_bytes(join_key(prefix, EXPORT_MANIFEST)))
    except NotFound:
        return None


def export_model(job: TrainingJob, task: Task, tokenizer, trained: dict[str, torch.Tensor], labels: dict[str, int] | None,
                 provenance: Provenance, samples: list[list[int]], work_dir: Path, *, whole: bool, uri: str | None = None,
                 formats: list[str] | None = None, merge_lora: bool | None = None) -> Exported:
    """Build, write, check and publish the model (spec.output unless overridden); rank 0 only."""
    spec = job.spec
    out = spec.output
    uri = uri or out.uri
    formats = formats or (out.formats if out else ["hf"])
    merge_lora = merge_lora if merge_lora is not None else bool(out and out.merge_lora)
    if "onnx" in formats and spec.model.lora is not None and not merge_lora:
        raise ExportError("spec.output.formats: onnx needs a full model: with LoRA set output.mergeLora: true")
    s3 = {"endpoint": spec.checkpoint.endpoint, "region": spec.checkpoint.region}
    started = time.monotonic()
    local = work_dir / "export"
    shutil.rmtree(local, ignore_errors=True)
    model = servable_model(job, task, tokenizer, trained, labels, work_dir / "cache", whole=whole, **s3)
    kind = write_hf_directory(model, tokenizer, local, merge_lora=merge_lora)
    del model
    diff = export_onnx(local, task, samples[:PARITY_SAMPLES], tokenizer.pad_token_id) if "onnx" in formats else None
    if diff is not None and diff > ONNX_TOLERANCE:
        log.error("ONNX parity failed: max |Δlogits| %.2e > %g (recorded in the model card)", diff, ONNX_TOLERANCE)
    (local / "README.md").write_text(model_card(job, kind, provenance, diff), encoding="utf-8")
    exported = Exported(uri, provenance.step, list(formats), dict(provenance.metrics), provenance.checkpoint, diff)
    record = {k: v for k, v in asdict(exported).items() if k not in ("files", "uri", "local")} | {"kind": kind}
    exported.files = publish(local, uri, record, attempts=spec.checkpoint.upload_attempts, **s3)
    exported.local = local
    log.info("model exported to %s (%s, %s, %d files) in %.1fs", uri, kind, "+".join(formats), len(exported.files),
             time.monotonic() - started)
    return exported
