"""spec.tracking.mlflow against a real `mlflow server` (sqlite store, artifacts in moto S3), started here.

A job preempted (SIGTERM, exit 75) and resumed is one MLflow run with a train_loss at every logged step,
its spec as params, its tags, the exported model as an artifact and a registered model version; a
tracking server that cannot be reached neither fails nor stalls training.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from kubetrain.ports import free_port
from kubetrain_testkit import tiny
from kubetrain_testkit.mlflow_server import MlflowServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("corpus")
    train, evals = tiny.write_corpus(out, n_train=200, n_eval=40)
    return {"train": train, "eval": evals, "tokenizer": tiny.train_tokenizer(out / "tokenizer", train)}


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, s3_server):
    bucket = s3_server.create_bucket("mlflow-artifacts")
    with MlflowServer(tmp_path_factory.mktemp("mlflow"), artifacts=f"s3://{bucket}/artifacts",
                      s3_env=s3_server.env()) as server:
        yield server


def job(tmp_path: Path, corpus: dict, name: str, tracking_uri: str, **overrides) -> Path:
    doc = tiny.job_doc(name, corpus["train"], corpus["eval"], corpus["tokenizer"], str(tmp_path / "ckpt"),
                       tracking={"mlflow": {"trackingUri": tracking_uri, "experiment": "tests", **overrides.pop("mlflow", {})}},
                       **overrides)
    return tiny.write_job(tmp_path / f"{name}.yaml", doc)


def test_a_preempted_and_resumed_job_is_one_mlflow_run_with_every_step_its_spec_and_its_model(
        tmp_path: Path, corpus: dict, mlflow_server: MlflowServer) -> None:
    from mlflow.tracking import MlflowClient

    path = job(tmp_path, corpus, "tracked", mlflow_server.uri, training__maxSteps=60, training__evalEverySteps=20,
               checkpoint__everySteps=10, output={"uri": str(tmp_path / "model")},
               mlflow={"registerModel": "tiny-sentiment"})
    first = tiny.LocalRun(path, env={}, work_dir=tmp_path / "w1")
    first.wait_for(r"step 25/60")
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish() == 75, first.output[-3000:]
    second = tiny.LocalRun(path, env={}, work_dir=tmp_path / "w2")
    assert second.finish() == 0, second.output[-3000:]
    assert second.matches(r"mlflow: continuing run (\w+)"), second.output[-3000:]

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("tests")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`kubetrain.job` = 'tracked'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert steps == list(range(1, 61)), steps  # every logged step, once, across the preemption
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval_accuracy")) == [20, 40, 60]
    assert run.data.params["training.learningRate"] == "0.001" and run.data.params["model.task"] == "sequence-classification"
    assert run.data.tags["kubetrain.namespace"] == "tests"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert {"model/config.json", "model/model.safetensors", "model/README.md"} <= artifacts, artifacts
    (version,) = client.search_model_versions("name = 'tiny-sentiment'")
    assert version.run_id == run.info.run_id and version.source.endswith("/model")


def test_an_unreachable_tracking_server_neither_fails_nor_stalls_training(tmp_path: Path, corpus: dict) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    run = tiny.LocalRun(job(tmp_path, corpus, "untracked", dead, training__maxSteps=20), env={}, work_dir=tmp_path / "w")
    assert run.finish() == 0, run.output[-3000:]
    assert run.matches(r"finished at step 20")
    assert run.matches(r"mlflow: start to http://127\.0\.0\.1:\d+ failed \(retrying with backoff, training goes on\)")
    assert run.matches(r"mlflow: requests still unsent after 30s at exit") or run.matches(r"mlflow: a request still unsent")
    assert time.monotonic() - started < 180
