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


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def base_dtype(spec: ModelSpec, precision: str) -> torch.dtype:
    """What the weights are stored in. Trained weights stay fp32 (AMP's master copy); a LoRA base is frozen,
    so it is kept in the precision training computes in: half the memory of fp32, and the same matmuls."""
    return PRECISION_DTYPES[precision] if spec.lora is not None else torch.float32


def model_config(spec: ModelSpec, task: Task, tokenizer, cache_dir: Path, **s3):
    """(the transformers config, the pretrained weights' location or None for random init)."""
    task_kwargs = task.config_kwargs(spec)
    overrides = dict(spec.config or {})
    if spec.name is not None:
        source = resolve_source(spec.name, cache_dir, **s3)
        overrides.pop("model_type", None)
        config = AutoConfig.from_pretrained(source, **NO_REMOTE_CODE, **task_kwargs, **overrides)
    else:
        source = None
        model_type = overrides.pop("model_type")
        overrides.setdefault("vocab_size", len(tokenizer))
        config = AutoConfig.for_model(model_type, **task_kwargs, **overrides)
    config.pad_token_id = tokenizer.pad_token_id
    return config, source


def build_model(spec: ModelSpec, task: Task, tokenizer, cache_dir: Path, *, precision: str = "fp32",
                device: torch.device | str = "cpu", weights: bool = True, **s3) -> torch.nn.Module:
    """The model on `device`, built there (no full fp32 copy in host memory first), LoRA adapters if asked.

    weights=False: parameters on the meta device and real buffers (FSDP ranks that receive their shards from
    rank 0). Quantized bases are loaded by transformers through bitsandbytes, on a GPU.
    """
    config, source = model_config(spec, task, tokenizer, cache_dir, **s3)
    auto, dtype = task.auto_model(), base_dtype(spec, precision)
    if not weights:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = auto.from_config(config, dtype=dtype)
    elif spec.quantization != "none":
        model = load_quantized(spec, auto, source, config, precision, torch.device(device))
    elif source is not None:
        model = auto.from_pretrained(source, config=config, dtype=dtype, device_map={"": torch.device(device)},
                                     **NO_REMOTE_CODE)
    else:
        with torch.device(device):
            model = auto.from_config(config, dtype=dtype)
    if spec.lora is not None:
        model = add_lora(model, spec, task)
    return model


def load_quantized(spec: ModelSpec, auto, source: str | None, config, precision: str, device: torch.device):
    """QLoRA's base: the pretrained weights quantized on load (bitsandbytes), norms and head kept in fp32."""
    if source is None:
        raise ModelError(f"spec.model.quantization: {spec.quantization} needs pretrained weights (spec.model.name); "
                         "a randomly initialised model has nothing worth quantizing")
    if device.type != "cuda":
        raise ModelError(f"spec.model.quantization: {spec.quantization} needs a CUDA GPU (bitsandbytes); this worker "
                         f"runs on {device.type}")
    try:
        from transformers import BitsAndBytesConfig
        import bitsandbytes  # noqa: F401 - the quantization backend, checked here for a readable error
    except ImportError as err:
        raise ModelError(f"spec.model.quantization: {spec.quantization} needs bitsandbytes in the trainer image "
                         f"({err})") from None
    from peft import prepare_model_for_kbit_training

    compute = PRECISION_DTYPES[precision]
    if spec.quantization == "4bit":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=compute)
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    model = auto.from_pretrained(source, config=config, dtype=compute, quantization_config=quant,
                                 device_map={"": device}, **NO_REMOTE_CODE)
    # gradient checkpointing is ours to enable (training.activationCheckpointing), not peft's
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def without_training_cache(model: torch.nn.Module) -> None:
    """Training never reads a key/value cache, but transformers builds one in every forward while config.use_cache
    is on (its default): an object per step, and per-layer state that makes a compiled block guard on its layer
    index (compile: regional would compile once per layer). Generation asks for its cache itself."""
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None):
        config.use_cache = False


def enable_activation_checkpointing(model: torch.nn.Module) -> int:
    """Recompute every transformer block in the backward (non-reentrant checkpointing: works with LoRA,
    torch.compile and FSDP). Returns how many blocks are checkpointed."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise ModelError(f"spec.training.activationCheckpointing: {inner.config.model_type!r} does not support "
                         "gradient checkpointing in transformers")
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name is deprecated there
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return sum(isinstance(m, GradientCheckpointingLayer) for m in inner.modules())


def add_lora(model: torch.nn.Module, spec: ModelSpec, task: Task) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type=task.peft_task_type,
        r=spec.lora.r,
        lora_alpha=spec.lora.alpha,
        lora_dropout=spec.lora.dropout,
        target_modules=spec.lora.target_modules,
    )
    model = get_peft_model(model, config)  # adapters in fp32 over a bf16/fp16 base (autocast_adapter_dtype)
    for p in model.parameters():  # e.g. a classifier head copied from a bf16 base (modules_to_save): fp32 master
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
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
