"""Model and tokenizer from a TrainingJob's `spec.model`: pretrained or from config, optional LoRA."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from kubetrain.api import ModelSpec

from .failures import ModelError
from .storage import open_storage, path_inside
from .tasks import Task

log = logging.getLogger("kubetrain.model")
# Nothing a model repository ships may run here: no remote code (auto_map modules), and transformers
# loads safetensors where present and other weights with torch.load(weights_only=True).
NO_REMOTE_CODE = {"trust_remote_code": False}


class ModelSourceError(ModelError):
    """The model or tokenizer location cannot be resolved."""


def resolve_source(location: str, cache_dir: Path, *, endpoint: str | None = None, region: str | None = None) -> str:
    """A from_pretrained-able location: local dirs as they are, s3:// downloaded, package:// found."""
    if location.startswith("package://"):
        module, _, sub = location.removeprefix("package://").partition("/")
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(f"spec.model: {location}: Python package {module!r} is not installed")
        path = Path(next(iter(spec.submodule_search_locations))) / sub
        if not path.is_dir():
            raise ModelSourceError(f"spec.model: {location}: {path} is not a directory")
        return str(path)
    if location.startswith("s3://"):
        storage, prefix = open_storage(location, endpoint=endpoint, region=region)
        dest = cache_dir / "models" / location.removeprefix("s3://").strip("/").replace("/", "_")
        base = prefix.strip("/")
        keys = storage.list_keys(f"{base}/" if base else "")
        if not keys:
            raise ModelSourceError(f"spec.model: {location}: no objects under this prefix")
        for key in keys:
            relative = key[len(base) + 1 :] if base else key
            if not relative or relative.endswith("/"):  # the prefix itself, or a "folder" marker
                continue
            try:
                target = path_inside(dest, relative)
            except ValueError:
                raise ModelSourceError(f"spec.model: {location}: refusing object key {key!r}: it would be written "
                                       f"outside the download directory") from None
            if not target.exists():
                storage.get_file(key, target)
        return str(dest)
    return location  # a local directory, or a hub id (needs network access from the pod)


def load_tokenizer(spec: ModelSpec, cache_dir: Path, **s3):
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(spec.tokenizer or spec.name, cache_dir, **s3), **NO_REMOTE_CODE)
    if tokenizer.pad_token is None:
        # Causal LMs often ship no pad token; padded positions are masked out of attention and loss.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(spec: ModelSpec, task: Task, tokenizer, cache_dir: Path, **s3) -> torch.nn.Module:
    """The model in fp32 (AMP keeps fp32 master weights), with LoRA adapters if asked for."""
    task_kwargs = task.config_kwargs(spec)
    auto = task.auto_model()
    overrides = dict(spec.config or {})
    if spec.name is not None:
        source = resolve_source(spec.name, cache_dir, **s3)
        overrides.pop("model_type", None)
        config = AutoConfig.from_pretrained(source, **NO_REMOTE_CODE, **task_kwargs, **overrides)
        config.pad_token_id = tokenizer.pad_token_id
        model = auto.from_pretrained(source, config=config, dtype=torch.float32, **NO_REMOTE_CODE)
    else:
        model_type = overrides.pop("model_type")
        overrides.setdefault("vocab_size", len(tokenizer))
        config = AutoConfig.for_model(model_type, **task_kwargs, **overrides)
        config.pad_token_id = tokenizer.pad_token_id
        model = auto.from_config(config, dtype=torch.float32)
    if spec.lora is not None:
        model = add_lora(model, spec, task)
    return model


def add_lora(model: torch.nn.Module, spec: ModelSpec, task: Task) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type=task.peft_task_type,
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.target_modules,
    )
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d: %d of %d parameters trainable (%.2f%%)", spec.lora.r, trainable, total, 100 * trainable / total)
    return model


def trainable_state_dict(model: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint must hold to restore the weights: everything, or only what LoRA trains.

    With LoRA the frozen base is rebuilt from spec.model on resume, so only trained tensors are saved.
    """
    state = model.state_dict()
    if not lora:
        return state
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trained}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], lora: bool) -> None:
    missing, unexpected = model.load_state_dict(state, strict=not lora)
    if unexpected:
        raise RuntimeError(f"checkpoint has tensors this model lacks: {unexpected[:5]}")
    if lora:
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        absent = trained - state.keys()
        if absent:
            raise RuntimeError(f"checkpoint lacks trained tensors: {sorted(absent)[:5]}")
