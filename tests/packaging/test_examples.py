"""Every example is a valid TrainingJob that the operator turns into pods (the cluster runs of
examples/trainingjob.yaml and examples/cpu-smoke.yaml are in test_operator_e2e.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetrain.api import load_training_job
from kubetrain_operator import builders
from kubetrain_testkit import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
DEFAULTS = builders.ClusterDefaults("s3://cluster-default/ckpt", "s3-creds", None)


def test_there_are_the_promised_examples():
    assert {p.name for p in EXAMPLES} >= {"trainingjob.yaml", "roberta-lora-gpu.yaml", "causal-lm-lora.yaml", "cpu-smoke.yaml",
                                          "chat-sft-lora.yaml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid_and_builds_pods(path: Path):
    job = builders.effective_job(load_training_job(str(path)), DEFAULTS)
    body = {**yaml.safe_load(path.read_text()), "metadata": {"name": job.metadata.name, "uid": "u"}}
    _, pods = builders.group(job, builders.owner_reference(body), attempt=1)
    assert len(pods) == job.spec.nodes
    limits = pods[0]["spec"]["containers"][0]["resources"].get("limits", {})
    if "gpu" in path.name or job.spec.procs_per_node > 1:
        assert int(limits["nvidia.com/gpu"]) == job.spec.procs_per_node, "one GPU per torchrun process"
    assert job.spec.checkpoint.uri.startswith("s3://")


def test_gpu_examples_use_lora_and_bf16():
    for name in ("roberta-lora-gpu.yaml", "causal-lm-lora.yaml", "chat-sft-lora.yaml"):
        job = load_training_job(str(next(p for p in EXAMPLES if p.name == name)))
        assert job.spec.model.lora is not None and job.spec.training.precision == "bf16"
    assert load_training_job(str(EXAMPLES[0].parent / "causal-lm-lora.yaml")).spec.model.task == "causal-lm"
