"""The TrainingJob API: the one source of truth for spec and status.

The CRD's openAPIV3Schema (`kubetrain.crd`), the operator and the trainer all read these models, so a
field exists in exactly one place. Field names are camelCase on the wire (Kubernetes convention) and
snake_case in Python.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from . import contracts
from .patterns import DNS_LABEL, DNS_SUBDOMAIN, QUANTITY, SIZE
from .pod_spec import MLFLOW_CREDENTIAL_ENV, S3_CREDENTIAL_ENV, PodCustomization

GROUP = "kubetrain.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainingJob"
PLURAL = "trainingjobs"
SINGULAR = "trainingjob"
SHORT_NAMES = ["tj"]

# Exit codes of the trainer's pods and of `kubetrain run --local`, shared by the trainer and the operator.
# 75 is EX_TEMPFAIL (sysexits.h), "temporary failure, retry": the group saved an emergency checkpoint
# on SIGTERM; the operator restarts it as a preemption, not counted against backoffLimit.
EXIT_PREEMPTED = 75
EXIT_INVALID_SPEC = 2  # the TrainingJob failed validation; nothing was started or written
# 65 is EX_DATAERR: the trainer met an error that another attempt would meet again (bad data, a missing
# bucket, access denied, divergence, an incompatible checkpoint); the operator fails the job at once.
EXIT_PERMANENT = 65
JOB_UID_ENV = "KUBETRAIN_JOB_UID"  # a local run's stand-in for metadata.uid, one per `kubetrain run --local`



def checkpoint_prefix(uri: str, namespace: str, name: str, uid: str | None = None) -> str:
    """<checkpoint.uri>/<namespace>/<job>: one job's checkpoints, whatever else shares the bucket; with
    checkpoint.resume: never, <.../job>/<uid>: one TrainingJob object's own (pass its uid)."""
    return f"{uri.rstrip('/')}/{namespace}/{name}" + (f"/{uid}" if uid else "")


def job_checkpoint_prefix(job: TrainingJob, uri: str | None = None, uid: str | None = None) -> str:
    """Where `job` keeps its checkpoints; `uid` (default: metadata.uid) counts only under resume: never."""
    own = (uid or job.metadata.uid) if job.spec.checkpoint.resume == "never" else None
    return checkpoint_prefix(uri or job.spec.checkpoint.uri, job.metadata.namespace, job.metadata.name, own)


def step_dir_name(step: int) -> str:
    """A checkpoint's directory under the job's prefix (sorts by step)."""
    return f"step-{step:09d}"


# Kubernetes object names that become DNS labels (pod hostnames) must be RFC 1123 labels.
# An image reference: [registry[:port]/]path[:tag][@sha256:digest].
IMAGE_REF = (r"^([a-zA-Z0-9.-]+(:[0-9]+)?/)?[a-z0-9]+([._-][a-z0-9]+)*(/[a-z0-9]+([._-][a-z0-9]+)*)*"
             r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$")
# Paths, URIs and names that end up in a pod's args: no control characters and nothing a shell would
# act on. Pods run without a shell, so this is defence in depth, and a clear error for a pasted typo.
SAFE_TEXT = r"^[^\x00-\x1f\x7f;&|$`<>\\'\"]+$"
# Bounds on a TrainingJob as text (kube-apiserver's own request limit is 3 MiB; a job is a few kB).
MAX_YAML_BYTES = 1 << 20
MAX_DEPTH = 32  # nesting of mappings and lists; the schema's deepest field is at 6
# Characters that forge text where a person reads it (status messages, Events, logs): controls, format
# characters (bidi overrides, zero-width) and the Unicode line and paragraph separators.
FORGING_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def check_text(value: Any, path: str, depth: int = 0) -> None:
    """Refuse nesting past MAX_DEPTH and forging characters anywhere in keys or values, naming the path."""
    if depth > MAX_DEPTH:
        raise SpecError(f"{path}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            check_text(key, path, depth + 1)
            check_text(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_text(item, f"{path}[{i}]", depth + 1)
    elif isinstance(value, str):
        bad = next((c for c in value if unicodedata.category(c) in FORGING_CATEGORIES), None)
        if bad is not None:
            raise SpecError(f"{path}: contains {unicodedata.name(bad, 'a control character')} (U+{ord(bad):04X}), "
                            "which can forge what a person reads")


def check_location(value: str | None) -> str | None:
    """A path or URI field: no `..` segment in a remote URI, no `~` (it is never expanded)."""
    if value is None:
        return value
    if "://" in value and ".." in value.split("://", 1)[1].split("/"):
        raise ValueError("a remote URI may not hold '..' segments")
    if value.startswith("~"):
        raise ValueError("'~' is not expanded here: write the absolute path")
    return value


# spec.model.config: transformers config values only. Loader options passed the same way would reach
# from_pretrained (trust_remote_code runs the model repository's code; token, revision, proxies, ...).
CONFIG_KEY = r"^[A-Za-z][A-Za-z0-9_]{0,127}$"  # a config attribute; `_private` loader internals refused
MAX_CONFIG_KEYS = 256
LOADER_OPTIONS = frozenset({
    "trust_remote_code", "token", "use_auth_token", "revision", "code_revision", "proxies", "cache_dir",
    "force_download", "resume_download", "local_files_only", "subfolder", "mirror", "return_unused_kwargs",
    "gguf_file", "adapter_kwargs", "adapter_name", "device_map", "key_mapping", "use_safetensors", "weights_only",
    "variant", "from_tf", "from_flax", "offload_folder", "offload_state_dict", "low_cpu_mem_usage",
    "quantization_config", "pretrained_model_name_or_path", "config", "state_dict",
})
ConfigValue = bool | int | float | Annotated[str, StringConstraints(max_length=4096, pattern=SAFE_TEXT)] | None
MAX_STEPS = 10**9  # a sanity bound for step counts and intervals (years of training at 30 steps/s)


def _quantity(value: int | str) -> int | str:
    if isinstance(value, int) and value < 0 or isinstance(value, str) and not (len(value) <= 64 and re.match(QUANTITY, value)):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (such as 4, 500m, 8Gi)")
    return value


Quantity = Annotated[int | str, AfterValidator(_quantity)]  # "4Gi", "500m", 1


def _yaml11_float(value: Any) -> Any:
    """Accept `2e-5`: YAML 1.1 (PyYAML) reads it as a string, Kubernetes' YAML reader as a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


class _Model(BaseModel):
    """camelCase on the wire, unknown fields rejected (a typo must not be silently ignored).

    Strict types (no `nodes: true` -> 1, no `image: 123` -> "123"), except that float fields take
    numbers written as strings, because of YAML 1.1.
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, strict=True,
        allow_inf_nan=False,
    )

    @model_validator(mode="before")
    @classmethod
    def _floats_from_yaml11_strings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        floats = [(f.alias, n) for n, f in cls.model_fields.items() if f.annotation in (float, float | None)]
        fixed = {k: _yaml11_float(data[k]) for pair in floats for k in pair if k in data}
        return {**data, **fixed} if fixed else data


class ResourceRequirements(_Model):
    limits: dict[str, Quantity] = Field(default_factory=dict)
    requests: dict[str, Quantity] = Field(default_factory=dict)


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class LoraSpec(_Model):
    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(16, gt=0, le=1e6, description="LoRA scaling numerator (lora_alpha).")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[Annotated[str, StringConstraints(min_length=1, pattern=SAFE_TEXT)]] | None = Field(
        None, max_length=1000, description="Module names to adapt; default: peft's choice for the architecture."
    )


class ModelSpec(_Model):
    name: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        pattern=SAFE_TEXT,
        description=(
            "Where the pretrained model is: a local directory, s3://bucket/prefix/ (downloaded), "
            "package://python_module/subdir (a model shipped inside an installed Python package), "
            "or a hub id. Omit it to train from `config` with random initialisation."
        ),
    )
    config: dict[str, ConfigValue] | None = Field(
        None,
        max_length=MAX_CONFIG_KEYS,
        description=(
            "transformers config keys (model_type required) for a randomly initialised model; with "
            "`name`, overrides applied to the pretrained config. A flat map of booleans, numbers and "
            "strings; loader options (trust_remote_code, token, revision, ...) are refused."
        ),
    )
    tokenizer: str | None = Field(None, min_length=1, max_length=4096, pattern=SAFE_TEXT,
                                  description="Tokenizer location; default: name.")
    task: Literal["sequence-classification", "causal-lm"]
    num_labels: int = Field(2, ge=2, le=100000, description="Classes (sequence-classification).")
    lora: LoraSpec | None = None
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="Load the frozen base quantized with bitsandbytes (QLoRA): 4bit is NF4 with double "
        "quantization, computing in the training precision. Needs lora and a CUDA GPU.",
    )

    _locations = field_validator("name", "tokenizer")(check_location)

    @field_validator("config")
    @classmethod
    def _config_values_only(cls, config: dict[str, ConfigValue] | None) -> dict[str, ConfigValue] | None:
        for key in config or {}:
            if key in LOADER_OPTIONS:
                raise ValueError(f"{key!r} is a loader option, not a model config value: refused")
            if not re.match(CONFIG_KEY, key):
                raise ValueError(f"{key!r} is not a config attribute name (letters, digits and _, at most 128)")
        return config

    @model_validator(mode="after")
    def _has_a_source(self) -> ModelSpec:
        if self.name is None and self.config is None:
            raise ValueError("set `name` (a pretrained model) or `config` (random init), or both")
        if self.name is None and self.tokenizer is None:
            raise ValueError("`tokenizer` is required when the model is built from `config` alone")
        if self.config is not None and self.name is None and "model_type" not in self.config:
            raise ValueError("`config.model_type` is required to build a model from config")
        if self.quantization != "none" and self.lora is None:
            raise ValueError(f"quantization {self.quantization} needs `lora`: a quantized base is frozen, only "
                             "adapters train (QLoRA)")
        return self


class DataSpec(_Model):
    train: str = Field(..., min_length=1, max_length=4096, pattern=SAFE_TEXT,
                       description="JSONL or CSV file: local path or s3://.")
    eval: str | None = Field(None, min_length=1, max_length=4096, pattern=SAFE_TEXT, description="Held-out JSONL or CSV file.")
    _locations = field_validator("train", "eval")(check_location)
    format: Literal["auto", "jsonl", "csv", "parquet", "hf-dataset"] = Field(
        "auto", description="auto: by the name (.csv, .parquet, a directory saved by datasets.Dataset.save_to_disk "
                            "(local only), else JSONL).")
    text_field: str = Field("text", min_length=1, max_length=256, pattern=SAFE_TEXT)
    text_pair_field: str | None = Field(None, min_length=1, max_length=256, pattern=SAFE_TEXT,
                                        description="Second segment (NLI, QA).")
    label_field: str = Field("label", min_length=1, max_length=256, pattern=SAFE_TEXT)
    style: Literal["auto", "text", "prompt-completion", "chat"] = Field(
        "auto",
        description="causal-lm rows: text (every token of textField is trained), prompt-completion (promptField "
        "then completionField), or chat (messagesField: a list of {role, content}, rendered with the tokenizer's "
        "chat template). auto: chat if the first row has messagesField, prompt-completion if it has promptField "
        "and completionField, else text. sequence-classification reads text.",
    )
    prompt_field: str = Field("prompt", min_length=1, max_length=256, pattern=SAFE_TEXT)
    completion_field: str = Field("completion", min_length=1, max_length=256, pattern=SAFE_TEXT)
    messages_field: str = Field("messages", min_length=1, max_length=256, pattern=SAFE_TEXT)
    train_on: Literal["completion", "all"] = Field(
        "completion",
        description="Which tokens of prompt-completion and chat rows the loss counts: completion (the completion; "
        "in chat, the assistant turns with their end-of-turn tokens) or all.",
    )
    chat_template: str | None = Field(
        None, min_length=1, max_length=65536,
        description="A Jinja chat template used instead of the tokenizer's (rendered in transformers' sandbox).",
    )
    max_length: int = Field(256, ge=8, le=131072, description="Tokens per sample; longer is cut.")
    max_tokens_per_batch: int = Field(
        16384,
        ge=8,
        le=16 * 2**20,
        description="Budget per micro-batch, counted as padded tokens (samples x longest sample), or as real "
                    "tokens with packing.",
    )
    max_samples_per_batch: int | None = Field(None, ge=1, le=2**20)
    packing: bool = Field(
        False,
        description="Lay each micro-batch's samples end to end in one row, with no padding; attention stays inside "
                    "each sample (variable-length flash attention on GPU, bf16/fp16). For BERT/RoBERTa-style "
                    "classifiers and causal LMs that use transformers' attention interface (GPT-2, Llama, ...).",
    )

    @model_validator(mode="after")
    def _budget_holds_a_sample(self) -> DataSpec:
        if self.max_tokens_per_batch < self.max_length:
            raise ValueError("maxTokensPerBatch must be at least maxLength (one sample per batch)")
        return self


class GenerationEvalSpec(_Model):
    samples: int = Field(64, ge=1, le=4096, description="The first this many eval rows: each prompt is answered "
                         "greedily and compared with the row's answer (its last completion or assistant turn).")
    max_new_tokens: int = Field(64, ge=1, le=4096)
    batch_size: int = Field(16, ge=1, le=1024, description="Prompts generated together on each process.")


class EarlyStoppingSpec(_Model):
    metric: str = Field("eval_loss", pattern=r"^eval_[a-z0-9_]+$")
    patience: int = Field(3, ge=1, description="Evaluations without improvement before stopping.")
    mode: Literal["auto", "min", "max"] = Field(
        "auto", description="auto: min for loss/perplexity, max otherwise."
    )
    min_delta: float = Field(0.0, ge=0)


class FsdpSpec(_Model):
    shard_across: Literal["world", "node"] = Field(
        "world",
        description="world: every process holds 1/worldSize of the parameters, gradients and optimizer state. "
        "node: shard inside each node and replicate across nodes (hybrid sharding: less inter-node traffic).",
    )
    cpu_offload: bool = Field(False, description="Keep the sharded parameters and optimizer state in host memory "
                              "(fits larger models, slower).")


class TrainingSpec(_Model):
    epochs: float = Field(3, gt=0, le=10000)
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Optimizer steps; overrides epochs.")
    learning_rate: float = Field(2e-5, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=10)
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    warmup_steps: int | None = Field(None, ge=0, le=MAX_STEPS, description="Overrides warmupRatio.")
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    gradient_accumulation: int = Field(1, ge=1, le=4096)
    batch_size: int | None = Field(
        None, ge=1, le=2**24,
        description="Samples per optimizer step over all processes, the same whatever the node count: each step's "
        "samples are split evenly over nodes x procsPerNode x gradientAccumulation micro-batches (raise "
        "gradientAccumulation if one does not fit in memory). Unset: steps are sized by data.maxTokensPerBatch.",
    )
    max_grad_norm: float | None = Field(1.0, gt=0, le=1e6)
    seed: int = Field(42, ge=0, le=2**32 - 1)
    deterministic: bool = Field(
        False, description="Deterministic kernels: bitwise-reproducible runs and resumes, slower."
    )
    eval_every_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="Default: at each epoch end.")
    log_every_steps: int = Field(10, ge=1, le=MAX_STEPS)
    early_stopping: EarlyStoppingSpec | None = None
    generation_eval: GenerationEvalSpec | None = Field(
        None, description="causal-lm with prompt-completion or chat eval rows: at each evaluation also answer the "
        "first prompts greedily, adding eval_exact_match and eval_rouge_l (ROUGE-L F1, rouge-score), which "
        "earlyStopping and output.from: best can use.",
    )
    on_non_finite: Literal["fail", "skip"] = Field(
        "fail",
        description="A step whose loss or gradient norm is NaN/Inf: fail the job (reason Diverged), or skip its "
        "update (up to nonFiniteSkipLimit steps). fp16 steps the grad scaler skips for overflow do not count.",
    )
    non_finite_skip_limit: int = Field(10, ge=0, le=MAX_STEPS, description="Skipped steps allowed under onNonFinite: skip.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every process holds the whole model and optimizer state. fsdp: torch FSDP2 shards them "
        "(per transformer block, bf16/fp16 parameters in compute, fp32 gradient reduction and optimizer state), "
        "and checkpoints are sharded (every process writes its shards; resumable on another world size).",
    )
    fsdp: FsdpSpec = Field(default_factory=FsdpSpec)
    activation_checkpointing: bool = Field(
        False, description="Recompute each transformer block's activations in the backward pass: far less activation "
        "memory (longer rows, bigger batches) for about a third more compute.",
    )
    fused_loss: Literal["auto", "off"] = Field(
        "auto",
        description="causal-lm: compute the LM head and the cross-entropy together, chunk by chunk, so the full "
        "logits (tokens x vocabulary) are never materialised (auto: whenever the model has a plain linear head). "
        "off: full logits.",
    )
    compile: Literal["off", "default", "regional", "reduce-overhead"] = Field(
        "off",
        description="torch.compile the forward/backward (GPU speed; costs a minute at startup). "
        "regional compiles one transformer block and reuses it for every block (seconds at startup, any strategy). "
        "reduce-overhead also replays the whole step as CUDA graphs (one GPU, ddp, gradientAccumulation 1, "
        "bf16 or fp32; else default).",
    )


class CheckpointSpec(_Model):
    uri: str = Field(
        ..., min_length=1, max_length=4096, pattern=SAFE_TEXT,
        description="s3://bucket/prefix or a local directory; <ns>/<job>/ is appended.",
    )
    every_steps: int = Field(500, ge=1, le=MAX_STEPS)
    resume: Literal["auto", "never"] = Field(
        "auto",
        description="auto: resume the newest complete checkpoint under <uri>/<ns>/<job>/ written for the same model "
        "and task (one for another is refused, failing the job); never: only this TrainingJob object's own "
        "checkpoints (restarts), never those of an earlier job of the same name.",
    )
    keep: int = Field(3, ge=1, le=1000, description="Newest complete checkpoints kept.")
    upload_attempts: int = Field(
        10, ge=1, le=100,
        description="Tries per checkpoint request before the save counts as failed; the wait doubles from 1 s to "
                    "30 s between tries, so 10 ride out about 2.5 minutes of storage refusing requests.",
    )
    s3_secret: str | None = Field(
        None,
        pattern=DNS_LABEL,
        description="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, exposed to pods as env.",
    )
    endpoint: str | None = Field(None, max_length=2048, pattern=r"^https?://[^\x00-\x20\x7f;&|$`<>\\'\"]+$",
                                 description="S3 endpoint URL.")
    region: str | None = Field(None, pattern=r"^[a-z0-9-]{1,64}$")

    _location = field_validator("uri")(check_location)

    @field_validator("endpoint")
    @classmethod
    def _plain_endpoint(cls, endpoint: str | None) -> str | None:
        """No credentials in the URL (it is copied into the ConfigMap and error messages), no link-local host
        (the cloud metadata service)."""
        if endpoint is None:
            return endpoint
        parts = urlsplit(endpoint)
        if "@" in parts.netloc:
            raise ValueError("credentials in the endpoint URL are refused: put them in the s3Secret")
        try:
            host = ipaddress.ip_address(parts.hostname or "")
        except ValueError:
            return endpoint  # a host name
        if host.is_link_local:
            raise ValueError(f"{host} is a link-local address (the cloud metadata service), not an S3 endpoint")
        return endpoint


class OutputSpec(_Model):
    """The trained model, written once training ends, for serving and sharing."""

    uri: str = Field(
        ..., min_length=1, max_length=4096, pattern=SAFE_TEXT,
        description="s3://bucket/prefix or a local directory (written as given: no <ns>/<job>/ appended).",
    )
    formats: list[Literal["hf", "onnx"]] = Field(
        default_factory=lambda: ["hf"], min_length=1, max_length=2,
        description="hf: a Hugging Face model directory (safetensors, config with the label names, tokenizer, "
                    "model card); onnx: also model.onnx (logits, dynamic batch and sequence axes), checked against "
                    "the PyTorch model with onnxruntime.",
    )
    merge_lora: bool = Field(False, description="With LoRA: write the merged full model, not the adapter.")
    from_: Literal["final", "best"] = Field(
        "final", alias="from",
        description="final: the weights training ended with; best: those of the evaluation that scored best by "
                    "training.earlyStopping.metric (its checkpoint is kept through retention).",
    )

    _location = field_validator("uri")(check_location)

    @field_validator("formats")
    @classmethod
    def _distinct(cls, formats: list[str]) -> list[str]:
        if len(set(formats)) != len(formats):
            raise ValueError("formats are listed once each")
        if "onnx" in formats and "hf" not in formats:
            raise ValueError("onnx is exported from the hf directory: list hf too")
        return formats


class MlflowSpec(_Model):
    """MLflow tracking of the run (rank 0): params, metrics at every log step and eval, the exported model."""

    tracking_uri: str = Field(..., min_length=1, max_length=2048, pattern=r"^(https?|databricks)://[^\x00-\x20\x7f;&|$`<>\\'\"]+$",
                              description="The tracking server, e.g. http://mlflow.mlflow:5000.")
    experiment: str = Field("kubetrain", min_length=1, max_length=256, pattern=SAFE_TEXT)
    run_name: str | None = Field(None, min_length=1, max_length=256, pattern=SAFE_TEXT,
                                 description="Default: the TrainingJob's name.")
    register_model: str | None = Field(None, min_length=1, max_length=256, pattern=SAFE_TEXT,
                                       description="Register the exported model (spec.output) under this name.")
    secret: str | None = Field(None, pattern=DNS_LABEL, description="Secret exposed to the trainer as env "
                               "(MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD).")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, uri: str) -> str:
        if "@" in urlsplit(uri).netloc:
            raise ValueError("credentials in the tracking URI are refused: put them in the secret")
        return uri


class TrackingSpec(_Model):
    mlflow: MlflowSpec | None = None


class MetricsSpec(_Model):
    port: int = Field(9400, ge=1024, le=65535)
    linger_seconds: int = Field(
        0, ge=0, le=3600, description="Keep serving /metrics this long after training ends, so the final values get scraped."
    )


class Coscheduling(_Model):
    """scheduler-plugins' coscheduling: a `scheduling.x-k8s.io/v1alpha1` PodGroup per attempt."""

    schedule_timeout_seconds: int | None = Field(
        None, ge=1, le=86400, description="How long the scheduler waits for the whole group to fit before it "
        "gives the group's reservations back and tries again (the PodGroup's scheduleTimeoutSeconds).")


class VolcanoGroup(_Model):
    """Volcano: a `scheduling.volcano.sh/v1beta1` PodGroup per attempt."""

    queue: str | None = Field(None, max_length=63, pattern=DNS_LABEL, description="Volcano queue (its default: "
                              "the cluster's default queue).")


class PodGroupPolicy(_Model):
    """Gang scheduling: each attempt's pods are placed all together or not at all, so a group that fits only
    partly holds no GPU at the rendezvous. The pods go to the gang scheduler (scheduler-plugins-scheduler or
    volcano; spec.pod.schedulerName names another) with a PodGroup of minMember = spec.nodes and the
    group's summed requests as minResources. The cluster must serve the PodGroup kind, else the job fails."""

    coscheduling: Coscheduling | None = None
    volcano: VolcanoGroup | None = None

    @model_validator(mode="after")
    def _one_scheduler(self) -> PodGroupPolicy:
        if (self.coscheduling is None) == (self.volcano is None):
            raise ValueError("set exactly one of coscheduling and volcano")
        return self


class RunPolicy(_Model):
    backoff_limit: int = Field(3, ge=0, le=1000)
    active_deadline_seconds: int | None = Field(None, ge=1, le=MAX_STEPS)
    ttl_seconds_after_finished: int | None = Field(None, ge=0, le=MAX_STEPS)
    clean_pod_policy: Literal["None", "Running", "All"] = "Running"
    suspend: bool = False
    scheduling_timeout_seconds: int | None = Field(
        None, ge=1, le=MAX_STEPS,
        description="Fail the job (reason SchedulingTimeout, not counted against backoffLimit) when a group's pods "
        "are not all running this long after the group was created: unschedulable, an image that cannot be "
        "pulled, a missing Secret. Unset: wait indefinitely (the Waiting condition says why).",
    )
    scheduling_timeout_policy: Literal["Fail", "Suspend"] = Field(
        "Fail", description="What schedulingTimeoutSeconds does: Fail the job, or Suspend it (spec.runPolicy.suspend "
        "set true, its pods deleted, condition Suspended with reason SchedulingTimeout) so that it frees what it "
        "holds and starts again, from its newest checkpoint, when the suspend is set back to false.",
    )
    pod_group_policy: PodGroupPolicy | None = Field(None, description=(
        "Gang scheduling: each attempt's pods are placed all together or not at all, through a PodGroup of "
        "minMember spec.nodes (scheduler-plugins coscheduling or Volcano); the pods go to "
        "scheduler-plugins-scheduler or volcano unless spec.pod.schedulerName names another. The cluster must "
        "serve the PodGroup kind, else the job fails (reason PodGroupUnavailable). Unset: no gang."))


class TrainingJobSpec(_Model):
    image: str = Field(..., min_length=1, max_length=1024, pattern=IMAGE_REF, description="Trainer image.")
    nodes: int = Field(1, ge=1, le=1024, description="Pods (torchrun --nnodes).")
    procs_per_node: int = Field(1, ge=1, le=64, description="torchrun --nproc-per-node.")
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    priority_class_name: str | None = Field(None, max_length=253, pattern=DNS_SUBDOMAIN)
    scratch_size: str = Field("100Gi", pattern=SIZE, description="Size limit of the pods' scratch emptyDir (/tmp: "
                              "model and data caches, checkpoint staging); the kubelet evicts a pod past it.")
    shm_size: str = Field("8Gi", pattern=SIZE, description="Size limit of /dev/shm (memory-backed: counts against "
                          "the pod's memory).")
    model: ModelSpec
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    checkpoint: CheckpointSpec
    output: OutputSpec | None = Field(None, description="Where the trained model goes; absent: checkpoints only.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    pod: PodCustomization = Field(default_factory=PodCustomization, description=(
        "Added to every trainer pod: env/envFrom, volumes (persistentVolumeClaim, secret, configMap, emptyDir) "
        "and volumeMounts, imagePullSecrets, serviceAccountName (its token only with automountServiceAccountToken), "
        "affinity, topologySpreadConstraints, schedulerName, labels and annotations. The restricted security "
        "context is not configurable."))

    @model_validator(mode="after")
    def _pod_env_keeps_the_secrets_credentials(self) -> TrainingJobSpec:
        """Credentials come from the Secrets the spec names; spec.pod.env may not shadow them."""
        from_secrets = {"checkpoint.s3Secret": self.checkpoint.s3_secret and S3_CREDENTIAL_ENV,
                        "tracking.mlflow.secret": self.tracking.mlflow and self.tracking.mlflow.secret and MLFLOW_CREDENTIAL_ENV}
        for var in self.pod.env:
            for field, names in from_secrets.items():
                if names and var.name in names:
                    raise ValueError(f"pod.env: {var.name} comes from {field}; set it there, or leave {field} unset")
        return self

    @model_validator(mode="after")
    def _registration_has_a_model(self) -> TrainingJobSpec:
        mlflow = self.tracking.mlflow
        if mlflow is not None and mlflow.register_model and self.output is None:
            raise ValueError("tracking.mlflow.registerModel registers the exported model: set output too")
        return self

    @model_validator(mode="after")
    def _best_is_defined(self) -> TrainingJobSpec:
        if self.output is not None and self.output.from_ == "best":
            if self.training.early_stopping is None:
                raise ValueError("output.from: best needs training.earlyStopping: its metric and mode say which "
                                 "evaluation is best (set a large patience to never stop early)")
            if self.data.eval is None:
                raise ValueError("output.from: best needs data.eval: without evaluations no checkpoint is best")
        return self

    @model_validator(mode="after")
    def _rows_fit_the_task(self) -> TrainingJobSpec:
        if self.model.task != "causal-lm" and self.data.style not in ("auto", "text"):
            raise ValueError(f"data.style {self.data.style} is for model.task causal-lm; {self.model.task} reads "
                             "textField (and textPairField)")
        if self.training.generation_eval is not None and (self.model.task != "causal-lm" or self.data.eval is None):
            raise ValueError("training.generationEval answers eval prompts: it needs model.task causal-lm and data.eval")
        batch = self.training.batch_size
        micro = self.nodes * self.procs_per_node * self.training.gradient_accumulation
        if batch is not None and batch < micro:
            raise ValueError(f"training.batchSize {batch} is smaller than nodes x procsPerNode x gradientAccumulation "
                             f"= {micro}: every micro-batch needs a sample")
        return self

    @model_validator(mode="after")
    def _strategy_fits(self) -> TrainingJobSpec:
        if self.training.strategy == "fsdp":
            if self.training.precision == "fp16":
                raise ValueError("training.precision fp16 with strategy fsdp: use bf16 (fsdp has no sharded fp16 grad "
                                 "scaler here) or strategy ddp")
            if self.model.quantization != "none":
                raise ValueError(f"model.quantization {self.model.quantization} with training.strategy fsdp: a "
                                 "quantized base is small already; use strategy ddp (QLoRA)")
        return self


Phase = Literal[tuple(p.value for p in contracts.Phase)]  # the wire type of contracts.Phase
ConditionType = Literal["Created", "Running", "Restarting", "Succeeded", "Failed", "Suspended", "Waiting"]


class Condition(_Model):
    type: ConditionType
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_transition_time: str | None = None


class CheckpointRef(_Model):
    step: int = Field(..., ge=0)
    uri: str
    time: str | None = None


class StartedFrom(_Model):
    """Where the current attempt's trainer started, as it reported it."""

    attempt: int = Field(..., ge=0)
    step: int = Field(0, ge=0)
    checkpoint: str | None = Field(None, description="The checkpoint resumed; absent: from scratch.")
    why: str | None = None
    changed: list[str] = Field(default_factory=list, description="Settings changed since that checkpoint (old -> new); "
                               "the job's spec applies from the resumed step.")


class TrainingProgress(_Model):
    """How far a running job is, from its trainer's own metrics (rank 0's /metrics), while it runs."""

    total_steps: int | None = Field(None, ge=0)
    percent: str | None = Field(None, description='Steps done of totalSteps, e.g. "42%".')
    eta: str | None = Field(None, description='Time left at the current speed, e.g. "1h05m" (minutes past an hour).')
    tokens_per_second: float | None = Field(None, description="Real (unpadded) training tokens per second, all ranks.")
    eval: dict[str, float] = Field(default_factory=dict, description="The last eval metrics.")


class OutputRef(_Model):
    """The exported model, once its manifest landed."""

    uri: str
    step: int = Field(..., ge=0)
    formats: list[str] = Field(default_factory=list)
    metrics: dict[str, float] = Field(default_factory=dict, description="The last eval metrics.")


class TrainingJobStatus(_Model):
    phase: Phase | None = None
    observed_generation: int | None = Field(None, description="The metadata.generation this status reflects; the "
                                            "running group runs it once it equals groupGeneration.")
    group_generation: int | None = Field(None, description="The metadata.generation the current pod group was created from.")
    started_from: StartedFrom | None = None
    conditions: list[Condition] = Field(default_factory=list)
    restarts: int = Field(0, description="Group recreations after a preemption or a failure.")
    preemptions: int = Field(0, description="Restarts caused by a preemption (do not count against backoffLimit).")
    failures: int = Field(0, description="Pod failures that counted against backoffLimit.")
    attempt: int = Field(0, description="Generation of the current pod group (label kubetrain.io/attempt).")
    step: int | None = None
    last_checkpoint: CheckpointRef | None = None
    output: OutputRef | None = None
    progress: TrainingProgress | None = None
    start_time: str | None = None
    completion_time: str | None = None
    message: str | None = None


class ObjectMeta(_Model):
    """The part of metadata the trainer and operator read; the API server owns the rest."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="allow")
    name: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)]
    namespace: Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL)] = "default"
    uid: Annotated[str | None, Field(max_length=64, pattern=r"^[A-Za-z0-9-]+$")] = None  # set by the API server


class TrainingJob(_Model):
    api_version: Literal["kubetrain.io/v1alpha1"]
    kind: Literal["TrainingJob"]
    metadata: ObjectMeta
    spec: TrainingJobSpec
    status: TrainingJobStatus | None = None


class SpecError(ValueError):
    """An invalid TrainingJob; each line of the message names a field by its YAML path."""


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(document)"


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in ("function-after",) and not str(p).startswith("function-"))
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        lines.append(f"{_field_path(loc)}: {msg}{shown}")
    return "\n".join(lines)


def parse_training_job(obj: Any) -> TrainingJob:
    """Validate a decoded TrainingJob; raise SpecError naming every bad field."""
    if not isinstance(obj, dict):
        raise SpecError(f"(document): expected a TrainingJob mapping, got {type(obj).__name__}")
    check_text(obj.get("spec"), "spec")  # not status: the operator's own messages carry pods' tracebacks
    try:
        return TrainingJob.model_validate(obj)
    except ValidationError as err:
        raise SpecError(format_validation_error(err)) from None


class StrictYamlLoader(yaml.SafeLoader):
    """YAML as a TrainingJob needs it: no anchors or aliases (an alias bomb expands to gigabytes), no
    duplicate keys (the last one would silently win), and nesting bounded by MAX_DEPTH."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            event = self.peek_event()
            raise yaml.YAMLError(f"line {event.start_mark.line + 1}: anchors and aliases are not allowed")
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.YAMLError(f"line {self.peek_event().start_mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.YAMLError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_training_job(path: str) -> TrainingJob:
    """Read and validate a TrainingJob YAML file (the one `kubectl apply -f` takes)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
        if len(raw) > MAX_YAML_BYTES:
            raise SpecError(f"{path}: larger than {MAX_YAML_BYTES // 1024} KiB; a TrainingJob is a few kB")
        docs = [d for d in yaml.load_all(raw.decode("utf-8"), Loader=StrictYamlLoader) if d is not None]
    except OSError as err:
        raise SpecError(f"{path}: cannot read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a text file (UTF-8 YAML expected)") from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if len(jobs) != 1:
        if len(docs) == 1:
            return parse_training_job(docs[0])
        raise SpecError(f"{path}: expected exactly one TrainingJob document, found {len(jobs)}")
    return parse_training_job(jobs[0])
