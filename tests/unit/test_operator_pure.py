"""The operator's pure parts: desired state (builders), pod classification (recovery), and the
reconcile state machine (plan), driven through whole job lifecycles as data."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from kubetrain.api import EXIT_PREEMPTED, CheckpointRef, SpecError, parse_training_job
from kubetrain.termination import TrainerReport
from kubetrain_operator.records import PodReport, Progress
from kubetrain_operator import builders
from kubetrain_operator.builders import ClusterDefaults
from kubetrain_operator.names import LABEL_ATTEMPT, LABEL_JOB, LABEL_RANK
from kubetrain_operator.reconcile import plan
from kubetrain_operator.records import Observed
from kubetrain_operator.recovery import classify

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=UTC)


def job_body(name: str = "bert", nodes: int = 2, **spec_overrides) -> dict:
    spec = {
        "image": "ghcr.io/example/trainer:1",
        "nodes": nodes,
        "procsPerNode": 1,
        "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}, "requests": {"cpu": "2"}},
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "training",
        "model": {"name": "roberta-base", "task": "sequence-classification", "numLabels": 2},
        "data": {"train": "s3://data/train.jsonl"},
        "checkpoint": {"uri": "s3://ckpt/runs", "everySteps": 50, "s3Secret": "s3-creds"},
        "runPolicy": {"backoffLimit": 3},
    }
    for key, value in spec_overrides.items():
        spec[key] = value
    return {"apiVersion": "kubetrain.io/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": name, "namespace": "ml", "uid": "uid-1234", "resourceVersion": "7"},
            "spec": spec}


def parsed(body: dict):
    return parse_training_job({k: v for k, v in body.items() if k != "status"})


# ---------------------------------------------------------------- builders

def test_pod_manifest_carries_the_spec_and_a_restricted_security_context():
    body = job_body()
    job = parsed(body)
    config, pods = builders.group(job, builders.owner_reference(body), attempt=3)
    assert [p["metadata"]["name"] for p in pods] == ["bert-0", "bert-1"]
    pod = pods[1]
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["labels"][LABEL_JOB] == "bert" and meta["labels"][LABEL_RANK] == "1" and meta["labels"][LABEL_ATTEMPT] == "3"
    assert meta["ownerReferences"] == [{"apiVersion": "kubetrain.io/v1alpha1", "kind": "TrainingJob", "name": "bert",
                                        "uid": "uid-1234", "controller": True, "blockOwnerDeletion": True}]
    assert (spec["hostname"], spec["subdomain"], spec["restartPolicy"]) == ("bert-1", "bert", "Never")
    assert spec["nodeSelector"] == {"pool": "gpu"} and spec["priorityClassName"] == "training"
    assert spec["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    c = spec["containers"][0]
    assert c["image"] == "ghcr.io/example/trainer:1"
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}, "requests": {"cpu": "2"}}
    assert "--rdzv-endpoint=bert-0.bert.ml.svc:29400" in c["args"] and "--nnodes=2" in c["args"]
    assert "--rdzv-id=$(KUBETRAIN_RDZV_ID)-3" in c["args"] and "--node-rank=1" in c["args"]
    assert not any("uid-1234" in a for a in c["args"]), "the rendezvous id is not derivable from pod metadata"
    assert c["args"][c["args"].index("--config") + 1] == "/etc/kubetrain/job.yaml"
    env = {e["name"]: e for e in c["env"]}
    assert env["KUBETRAIN_RDZV_ID"]["valueFrom"]["secretKeyRef"] == {"name": "bert-rendezvous", "key": "id"}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "s3-creds", "key": "AWS_ACCESS_KEY_ID", "optional": False}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert not any("value" in e and "SECRET" in e["name"] for e in c["env"]), "credentials only from the Secret"
    # restricted Pod Security Standard, field by field
    psc, csc = spec["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0 and psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert csc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                   "capabilities": {"drop": ["ALL"]}}
    assert spec["automountServiceAccountToken"] is False
    assert not any(v.get("hostPath") for v in spec["volumes"])
    assert meta["annotations"]["kubetrain.io/config-hash"] == builders.config_hash(config)


def test_config_map_holds_the_effective_job_and_it_round_trips():
    body = job_body(checkpoint={"uri": "../local", "everySteps": 10})
    job = builders.effective_job(parsed(body), ClusterDefaults("s3://team/ckpt", "team-s3", "http://minio:9000"))
    config = builders.config_map(job, builders.owner_reference(body))
    again = parse_training_job(yaml.safe_load(config["data"]["job.yaml"]))
    assert again.spec.checkpoint.uri == "s3://team/ckpt" and again.spec.checkpoint.s3_secret == "team-s3"
    assert again.spec.checkpoint.endpoint == "http://minio:9000" and again.spec.checkpoint.every_steps == 10
    assert again.spec == job.spec


def test_service_is_headless_and_publishes_unready_pods():
    body = job_body()
    svc = builders.service(parsed(body), builders.owner_reference(body))
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {LABEL_JOB: "bert"}
    assert svc["metadata"]["name"] == "bert"


@pytest.mark.parametrize("name, spec, field", [
    ("9lives", {}, "metadata.name: must start with a letter"),
    ("a" * 62, {}, "metadata.name: too long"),
    ("bert", {"checkpoint": {"uri": "/mnt/ckpt"}}, "spec.checkpoint.uri"),
    ("bert", {"metrics": {"port": 29400}}, "spec.metrics.port"),
])
def test_cluster_only_errors_name_the_field(name, spec, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        builders.effective_job(parsed(job_body(name, **spec)), ClusterDefaults())


# ---------------------------------------------------------------- recovery

def observed_pod(manifest: dict, phase: str = "Running", *, exit_code: int | None = None, message: str | None = None,
                 deleting: bool = False, conditions: list | None = None, reason: str | None = None, uid: str = "",
                 finished_at: datetime | None = None) -> dict:
    pod = copy.deepcopy(manifest)
    pod["metadata"]["uid"] = uid or f"pod-{pod['metadata']['name']}-{pod['metadata']['labels'][LABEL_ATTEMPT]}"
    if deleting:
        pod["metadata"]["deletionTimestamp"] = "2026-11-23T12:00:00Z"
    status = {"phase": phase, "podIP": "10.0.0.1", "conditions": conditions or []}
    if reason:
        status["reason"] = reason
    if exit_code is not None:
        terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error", "message": message or ""}
        if finished_at is not None:  # the kubelet always says when; the unit tests that do not care leave it out
            terminated["finishedAt"] = finished_at.strftime("%Y-%m-%dT%H:%M:%SZ")
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    pod["status"] = status
    return pod


def one_pod(**kw) -> dict:
    body = job_body()
    _, pods = builders.group(parsed(body), builders.owner_reference(body), 1)
    return observed_pod(pods[0], **kw)


@pytest.mark.parametrize("kw, kind, reason", [
    ({"phase": "Running"}, "running", ""),
    ({"phase": "Pending"}, "pending", ""),
    ({"phase": "Succeeded", "exit_code": 0}, "succeeded", ""),
    ({"phase": "Failed", "exit_code": EXIT_PREEMPTED}, "preempted", "Preempted"),
    ({"phase": "Running", "deleting": True}, "preempted", "Preempted"),
    ({"phase": "Running", "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]},
     "preempted", "Preempted"),
    ({"phase": "Failed", "reason": "NodeLost"}, "preempted", "Preempted"),
    ({"phase": "Failed", "exit_code": 1, "message": "Traceback\nFileNotFoundError: train.jsonl"}, "failed", "PodFailed"),
    ({"phase": "Failed", "exit_code": 2, "message": "invalid TrainingJob"}, "invalid", "InvalidSpec"),
    ({"phase": "Failed", "exit_code": 65, "message": TrainerReport(
        "failed", reason="StorageError", message="storage error: bucket 'b' does not exist (s3://b/x)",
        permanent=True).encode()}, "permanent", "StorageError"),
    ({"phase": "Failed", "exit_code": 65}, "permanent", "PodFailed"),
    ({"phase": "Failed", "exit_code": 1, "message": TrainerReport(
        "failed", reason="PodFailed", message="RuntimeError: Connection closed by peer").encode()}, "failed", "PodFailed"),
])
def test_classify(kw, kind, reason):
    outcome = classify(one_pod(**kw))
    assert (outcome.kind, outcome.reason) == (kind, reason)


def test_the_trainers_one_line_account_is_the_message_not_a_traceback():
    report = TrainerReport("failed", reason="DataError", permanent=True,
                           message="data error: s3://b/train.jsonl row 201: missing field 'text' (spec.data.textField)")
    outcome = classify(one_pod(phase="Failed", exit_code=65, message=report.encode()))
    assert outcome.message == ("data error: s3://b/train.jsonl row 201: missing field 'text' (spec.data.textField) "
                               "(pod bert-0, exit code 65)")


def test_a_failure_message_names_pod_exit_code_and_the_error():
    outcome = classify(one_pod(phase="Failed", exit_code=1, message="line 1\nFileNotFoundError: train.jsonl"))
    assert outcome.message == "pod bert-0 failed: exit code 1: line 1 | FileNotFoundError: train.jsonl"


# ---------------------------------------------------------------- reconcile: whole lifecycles as data

class Cluster:
    """Applies plans to an in-memory job + pods, the way the API would (test double for `kube`)."""

    def __init__(self, body: dict, defaults: ClusterDefaults = ClusterDefaults()):
        self.job, self.defaults = body, defaults
        self.pods: dict[str, dict] = {}
        self.service = False
        self.events: list[tuple[str, str]] = []
        self.now = T0
        self.created: list[str] = []
        self.reports: list[PodReport] = []
        self.predecessors = 0
        self.drop_spec_writes = False  # the operator's spec write fails (a lost request)
        self.pod_groups: dict[str, dict] = {}
        self.unserved: str | None = None  # what creating a PodGroup of a kind the cluster lacks would say

    def step(self, live=None):
        p = plan(Observed(copy.deepcopy(self.job), list(self.pods.values()), self.service, self.now, live,
                          reports=self.reports, predecessor_pods=self.predecessors, unserved=self.unserved), self.defaults)
        if p.status is not None:
            self.job["status"] = p.status
        for m in p.create:
            if m["kind"] == "Service":
                self.service = True
            elif m["kind"] == "Pod":
                assert m["metadata"]["name"] not in self.pods, "created a pod twice"
                self.pods[m["metadata"]["name"]] = observed_pod(m, "Pending")
                self.created.append(m["metadata"]["name"])
            elif m["kind"] == "PodGroup":
                self.pod_groups.setdefault(m["metadata"]["name"], m)  # create-only
        for pod in p.delete_pods:
            self.pods[pod["metadata"]["name"]]["metadata"]["deletionTimestamp"] = "now"
        for ref in p.delete_pod_groups:
            self.pod_groups.pop(ref["metadata"]["name"], None)
        self.events += [(e.reason, e.message) for e in p.events]
        if p.suspend_job and not self.drop_spec_writes:
            self.edit_spec(runPolicy={**self.job["spec"].get("runPolicy", {}), "suspend": True})
        return p

    def edit_spec(self, **fields):
        """A spec write, as the API makes it: a new generation."""
        self.job["spec"].update(fields)
        self.job["metadata"]["generation"] = self.job["metadata"].get("generation", 1) + 1

    def set_pods(self, **kw):
        for name in list(self.pods):
            self.pods[name] = observed_pod(self.pods[name], **kw, uid=self.pods[name]["metadata"]["uid"])

    def gone(self):
        self.pods = {n: p for n, p in self.pods.items() if not p["metadata"].get("deletionTimestamp")}

    @property
    def status(self) -> dict:
        return self.job.get("status", {})


def test_happy_path_creates_once_runs_and_succeeds_with_progress_from_the_report():
    c = Cluster(job_body())
    first = c.step()
    assert [m["kind"] for m in first.create] == ["Secret", "NetworkPolicy", "Service", "Pod", "Pod"]
    assert first.replace_config is not None
    assert c.status["phase"] == "Pending" and c.status["attempt"] == 1 and c.status["startTime"] == "2026-11-23T12:00:00Z"
    again = c.step()
    assert again.create == [] and again.status is None, "a second reconcile changes nothing"
    c.set_pods(phase="Running")
    c.step()
    assert c.status["phase"] == "Running" and c.events[-1] == ("GroupRunning", "all 2 pods running (attempt 1)")
    report = TrainerReport("finished", 120, 120, "s3://ckpt/runs/ml/bert/step-000000120", "2026-11-23T12:30:00Z").encode()
    c.set_pods(phase="Succeeded", exit_code=0, message=report)
    c.now += timedelta(minutes=31)
    c.step()
    s = c.status
    assert s["phase"] == "Succeeded" and s["step"] == 120 and s["lastCheckpoint"]["step"] == 120
    assert s["completionTime"] == "2026-11-23T12:31:00Z" and c.events[-1][0] == "JobSucceeded"
    assert {x["type"]: x["status"] for x in s["conditions"]} == {"Created": "True", "Running": "False", "Succeeded": "True"}


def test_a_deleted_pod_is_a_preemption_the_group_is_recreated_once_old_pods_are_gone():
    c = Cluster(job_body())
    c.step()
    c.set_pods(phase="Running")
    c.step()
    c.pods["bert-1"]["metadata"]["deletionTimestamp"] = "now"  # kubectl delete pod bert-1
    p = c.step()
    assert c.status["phase"] == "Restarting" and c.events[-1][0] == "Preempted"
    assert [d["metadata"]["name"] for d in p.delete_pods] == ["bert-0"], "the others are torn down, the deleted one is left be"
    report = TrainerReport("preempted", 37, 37, "s3://ckpt/runs/ml/bert/step-000000037").encode()
    c.set_pods(phase="Failed", exit_code=EXIT_PREEMPTED, message=report, deleting=True)
    assert c.step().create == [], "no new group while old pods exist"
    assert c.status["step"] == 37 and c.status["lastCheckpoint"]["step"] == 37
    c.gone()
    p = c.step()
    assert [m["metadata"]["name"] for m in p.create if m["kind"] == "Pod"] == ["bert-0", "bert-1"]
    s = c.status
    assert (s["attempt"], s["restarts"], s["preemptions"], s["failures"]) == (2, 1, 1, 0)
    assert all(m["metadata"]["labels"][LABEL_ATTEMPT] == "2" for m in p.create if m["kind"] == "Pod")
    c.set_pods(phase="Running")
    c.step()
    assert c.status["phase"] == "Running"
    assert {x["type"]: x["status"] for x in c.status["conditions"]}["Restarting"] == "False"


def test_failures_count_against_backoff_limit_then_fail_with_the_pod_reason():
    c = Cluster(job_body(runPolicy={"backoffLimit": 3}))
    c.step()
    for attempt in range(1, 5):
        c.set_pods(phase="Running")
        c.step()
        c.pods["bert-0"] = observed_pod(c.pods["bert-0"], "Failed", exit_code=1, message="ValueError: boom",
                                        uid=c.pods["bert-0"]["metadata"]["uid"])
        c.step()
        assert c.status["phase"] == "Restarting"
        c.gone()
        c.step()
    s = c.status
    assert s["phase"] == "Failed" and (s["failures"], s["restarts"], s["preemptions"]) == (4, 3, 0)
    assert "backoffLimit 3" in s["message"] and "ValueError: boom" in s["message"]
    assert c.events[-1][0] == "BackoffLimitExceeded"
    assert c.created.count("bert-0") == 4


def test_a_node_loss_seen_after_the_failure_it_caused_still_counts_as_a_preemption():
    c = Cluster(job_body())
    c.step()
    c.set_pods(phase="Running")
    c.step()
    c.pods["bert-0"] = observed_pod(c.pods["bert-0"], "Failed", exit_code=1, message="peer closed", uid="a")
    c.step()
    assert c.status["phase"] == "Restarting"
    c.pods["bert-1"] = observed_pod(c.pods["bert-1"], "Failed", reason="NodeLost", uid="b")
    c.step()
    c.gone()
    c.pods.clear()
    c.step()
    assert (c.status["preemptions"], c.status["failures"]) == (1, 0)


def test_a_vanished_pod_while_running_is_a_preemption_but_while_pending_it_is_recreated():
    c = Cluster(job_body())
    c.step()
    del c.pods["bert-1"]  # operator stopped mid-creation, say
    p = c.step()
    assert [m["metadata"]["name"] for m in p.create if m["kind"] == "Pod"] == ["bert-1"]
    c.set_pods(phase="Running")
    c.step()
    del c.pods["bert-0"]  # force-deleted
    c.step()
    assert c.status["phase"] == "Restarting" and "bert-0 disappeared" in c.status["message"]


def test_invalid_spec_fails_without_creating_anything():
    body = job_body(nodes=0)
    c = Cluster(body)
    p = c.step()
    assert p.create == [] and c.status["phase"] == "Failed"
    assert "spec.nodes" in c.status["message"] and c.events == [("InvalidSpec", c.status["message"])]
    assert c.step().status is None, "reported once"


def test_suspend_deletes_pods_and_resume_starts_a_new_attempt_without_counting_a_restart():
    body = job_body()
    c = Cluster(body)
    c.step()
    c.set_pods(phase="Running")
    c.step()
    c.job["spec"]["runPolicy"] = {"suspend": True}
    p = c.step()
    assert c.status["phase"] == "Suspended" and len(p.delete_pods) == 2
    assert c.status["conditions"][-1]["reason"] == "Suspending", "not yet: the pods are saving their checkpoint"
    c.gone()
    # The pods' final reports were seen on watch events only: they were deleted before this reconcile listed them.
    uri = "s3://ckpt/runs/ml/bert/step-000000045"
    p = plan(Observed(copy.deepcopy(c.job), [], c.service, c.now,
                      reports=[PodReport(1, TrainerReport("preempted", 45, 45, uri, "2026-11-23T12:20:00Z"))]))
    c.job["status"] = p.status
    suspended = next(x for x in c.status["conditions"] if x["type"] == "Suspended")
    assert (suspended["status"], suspended["reason"]) == ("True", "JobSuspended")
    assert c.status["step"] == 45 and c.status["lastCheckpoint"]["uri"] == uri and uri in c.status["message"]
    c.job["spec"]["runPolicy"] = {"suspend": False}
    c.now += timedelta(hours=1)
    p = c.step()
    assert c.status["phase"] == "Pending" and c.status["attempt"] == 2 and c.status["restarts"] == 0
    assert c.status["startTime"] == "2026-11-23T13:00:00Z" and c.events[-1][0] == "Resumed"


def test_active_deadline_fails_the_job_and_stops_its_pods():
    c = Cluster(job_body(runPolicy={"activeDeadlineSeconds": 60}))
    c.step()
    c.set_pods(phase="Running")
    p = c.step()
    assert p.requeue_after == pytest.approx(60)
    c.now += timedelta(seconds=61)
    p = c.step()
    assert c.status["phase"] == "Failed" and c.events[-1][0] == "DeadlineExceeded" and len(p.delete_pods) == 2


def test_ttl_after_finished_deletes_the_job_and_clean_pod_policy_all_deletes_pods():
    c = Cluster(job_body(runPolicy={"ttlSecondsAfterFinished": 100, "cleanPodPolicy": "All"}))
    c.step()
    c.set_pods(phase="Succeeded", exit_code=0)
    p = c.step()
    assert c.status["phase"] == "Succeeded" and len(p.delete_pods) == 2 and not p.delete_job
    assert p.requeue_after == pytest.approx(100)
    c.now += timedelta(seconds=101)
    assert c.step().delete_job


def test_exit_code_2_from_the_trainer_fails_at_once():
    c = Cluster(job_body())
    c.step()
    c.pods["bert-0"] = observed_pod(c.pods["bert-0"], "Failed", exit_code=2, message="invalid TrainingJob: x", uid="z")
    c.step()
    assert c.status["phase"] == "Failed" and c.status["failures"] == 0


PERMANENT = TrainerReport("failed", reason="DataError", permanent=True,
                          message="data error: s3://b/train.jsonl row 201: missing field 'text' (spec.data.textField)")


def test_a_permanent_failure_fails_the_job_at_the_first_attempt_with_the_trainers_reason_and_message():
    c = Cluster(job_body(runPolicy={"backoffLimit": 3}))
    running(c)
    c.pods["bert-0"] = observed_pod(c.pods["bert-0"], "Failed", exit_code=65, message=PERMANENT.encode(), uid="z")
    p = c.step()
    s = c.status
    assert (s["phase"], s["failures"], s["restarts"]) == ("Failed", 0, 0)
    assert s["message"] == PERMANENT.message + " (pod bert-0, exit code 65)"
    assert {x["type"]: x["reason"] for x in s["conditions"]}["Failed"] == "DataError"
    assert c.events[-1][0] == "DataError"
    assert [d["metadata"]["name"] for d in p.delete_pods] == ["bert-1"]


def test_a_permanent_failure_seen_after_the_peer_failure_it_caused_still_fails_at_once():
    c = Cluster(job_body(runPolicy={"backoffLimit": 3}))
    running(c)
    c.pods["bert-1"] = observed_pod(c.pods["bert-1"], "Failed", exit_code=1, message="RuntimeError: peer closed", uid="a")
    c.step()
    assert c.status["phase"] == "Restarting"
    c.pods["bert-0"] = observed_pod(c.pods["bert-0"], "Failed", exit_code=65, message=PERMANENT.encode(), uid="b")
    c.step()
    assert (c.status["phase"], c.status["failures"]) == ("Failed", 0)
    assert c.status["message"].startswith("data error: s3://b/train.jsonl row 201")


def test_status_written_by_someone_else_does_not_crash_the_reconcile():
    body = job_body()
    body["status"] = {"phase": "Exploded", "restarts": "many"}
    p = Cluster(body).step()
    assert json.dumps(p.status) and p.status["phase"] == "Pending"


def test_node_0_hosts_the_rendezvous_and_a_port_range_gives_each_job_its_own_port():
    body = job_body()
    job = parsed(body)
    _, pods = builders.group(job, builders.owner_reference(body), 1)
    assert all("--rdzv-backend=static" in p["spec"]["containers"][0]["args"] for p in pods)  # node 0 hosts its store
    assert builders.rendezvous_port("any-uid", ClusterDefaults()) == 29400
    shared = ClusterDefaults(rendezvous_ports=(30000, 39999))
    ports = {builders.rendezvous_port(f"uid-{i}", shared) for i in range(50)}
    assert all(30000 <= p <= 39999 for p in ports) and len(ports) > 40
    assert builders.rendezvous_port("uid-1", shared) == builders.rendezvous_port("uid-1", shared)
    p = plan(Observed(body, [], False, T0), shared)
    port = builders.rendezvous_port("uid-1234", shared)
    svc = next(m for m in p.create if m["kind"] == "Service")
    assert svc["spec"]["ports"][0]["port"] == port
    assert all(f"--rdzv-endpoint=bert-0.bert.ml.svc:{port}" in m["spec"]["containers"][0]["args"]
               for m in p.create if m["kind"] == "Pod")


def test_pod_k_is_node_k_so_pod_0_holds_global_rank_0():
    """The PodMonitor and the operator read rank 0 in pod 0; with 12 nodes, sorting names would put pod 10 second."""
    body = job_body(nodes=12)
    _, pods = builders.group(parsed(body), builders.owner_reference(body), 1)
    ranks = [next(a for a in p["spec"]["containers"][0]["args"] if a.startswith("--node-rank=")) for p in pods]
    assert ranks == [f"--node-rank={k}" for k in range(12)]


def test_an_object_of_the_jobs_name_held_by_another_owner_fails_the_job_and_nothing_is_created():
    body = job_body()
    p = plan(Observed(body, [], False, T0, foreign="ConfigMap ml/bert-config already exists and is not controlled"))
    assert p.create == [] and p.replace_config is None
    assert p.status["phase"] == "Failed" and p.status["message"].startswith("ConfigMap ml/bert-config")
    assert [(e.type, e.reason) for e in p.events] == [("Warning", "NameConflict")]
    done = copy.deepcopy(body)
    done["status"] = p.status
    assert plan(Observed(done, [], False, T0, foreign="still there")).status is None, "decided once"


def test_ownership_is_by_controller_uid_and_a_predecessor_of_the_same_name_is_recognised():
    body = job_body()
    ours = {"metadata": {"ownerReferences": [builders.owner_reference(body)]}}
    assert builders.controlled_by(ours, body["metadata"]["uid"]) and not builders.controlled_by(ours, "other-uid")
    assert not builders.controlled_by({"metadata": {}}, body["metadata"]["uid"])
    assert builders.left_by_predecessor(ours, "bert") and not builders.left_by_predecessor(ours, "gpt")
    plain = {"metadata": {"ownerReferences": [{**builders.owner_reference(body), "controller": False}]}}
    assert not builders.controlled_by(plain, body["metadata"]["uid"]) and not builders.left_by_predecessor(plain, "bert")


def test_an_image_or_toleration_outside_the_operators_allowlist_is_invalid():
    policy = ClusterDefaults(allowed_images=("registry.example.com/ml/", "ghcr.io/acme/trainer"),
                             allowed_toleration_keys=("nvidia.com/gpu",))
    ok = job_body(image="ghcr.io/acme/trainer:1.2", tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}])
    assert builders.job_from_object(ok, policy).spec.image == "ghcr.io/acme/trainer:1.2"
    assert builders.job_from_object(job_body(image="registry.example.com/ml/any/thing:3", tolerations=[]), policy)
    for image in ("ghcr.io/acme/trainer-evil:1", "docker.io/library/busybox:1", "registry.example.com/mlx/t:1"):
        with pytest.raises(SpecError, match=r"spec.image: .* not in the operator's image allowlist"):
            builders.job_from_object(job_body(image=image, tolerations=[]), policy)
    with pytest.raises(SpecError, match=r"spec.tolerations\[0\]: no key \(it tolerates every taint\)"):
        builders.job_from_object(job_body(tolerations=[{"operator": "Exists"}], image="ghcr.io/acme/trainer:1"), policy)
    with pytest.raises(SpecError, match=r"spec.tolerations\[1\]: key 'node-role/master'"):
        builders.job_from_object(job_body(image="ghcr.io/acme/trainer:1", tolerations=[
            {"key": "nvidia.com/gpu", "operator": "Exists"}, {"key": "node-role/master", "operator": "Exists"}]), policy)
    c = Cluster(job_body(image="docker.io/library/evil:1"), defaults=policy)
    c.step()
    assert c.status["phase"] == "Failed" and "spec.image" in c.status["message"] and not c.created
    assert builders.job_from_object(job_body(image="anything/at:all", tolerations=[{"operator": "Exists"}]), ClusterDefaults())


def test_scratch_and_shared_memory_have_size_limits():
    body = job_body()
    _, pods = builders.group(parsed(body), builders.owner_reference(body), 1)
    volumes = {v["name"]: v for v in pods[0]["spec"]["volumes"]}
    assert volumes["scratch"]["emptyDir"] == {"sizeLimit": "100Gi"}
    assert volumes["shm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    custom = job_body(scratchSize="20Gi", shmSize="2Gi")
    _, pods = builders.group(parsed(custom), builders.owner_reference(custom), 1)
    assert [v["emptyDir"]["sizeLimit"] for v in pods[0]["spec"]["volumes"][1:]] == ["20Gi", "2Gi"]


def test_a_group_comes_with_its_rendezvous_secret_and_a_network_policy_isolating_the_trainers():
    body = job_body()
    p = plan(Observed(body, [], False, T0, token="f" * 32), ClusterDefaults(operator_namespace="kubetrain-system",
                                                                             metrics_namespaces=("monitoring",)))
    kinds = [m["kind"] for m in p.create]
    assert kinds[:3] == ["Secret", "NetworkPolicy", "Service"] and kinds.count("Pod") == 2, "the Secret before the pods"
    secret, policy = p.create[0], p.create[1]
    assert secret["metadata"]["name"] == "bert-rendezvous" and secret["stringData"] == {"id": "f" * 32}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1234"
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": {LABEL_JOB: "bert"}} and spec["policyTypes"] == ["Ingress"]
    same_job, metrics = spec["ingress"]
    assert same_job == {"from": [{"podSelector": {"matchLabels": {LABEL_JOB: "bert"}}}]}, "every port, this job only"
    assert metrics["ports"] == [{"port": 9400, "protocol": "TCP"}]
    assert metrics["from"] == [
        {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "kubetrain-operator"}},
         "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubetrain-system"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    off = plan(Observed(body, [], False, T0, token="x"), ClusterDefaults(network_policy=False))
    assert "NetworkPolicy" not in [m["kind"] for m in off.create]


# ---------------------------------------------------------------- identity, spec edits, the truth about checkpoints


def running(c: Cluster) -> None:
    c.step()
    c.set_pods(phase="Running")
    c.step()
    assert c.status["phase"] == "Running"


def test_a_spec_edit_restarts_the_group_gracefully_and_the_new_group_runs_the_new_spec():
    c = Cluster(job_body())
    c.job["metadata"]["generation"] = 1
    running(c)
    assert (c.status["observedGeneration"], c.status["groupGeneration"]) == (1, 1)
    c.job["spec"]["runPolicy"]["backoffLimit"] = 5  # acts without new pods
    c.job["metadata"]["generation"] = 2
    assert c.step().delete_pods == [] and c.status["observedGeneration"] == 2
    c.job["spec"]["checkpoint"]["everySteps"] = 10
    c.job["metadata"]["generation"] = 3
    p = c.step()
    assert c.status["phase"] == "Restarting" and len(p.delete_pods) == 2
    assert c.events[-1][0] == "SpecChanged" and "generation 1 -> 3" in c.events[-1][1]
    c.set_pods(phase="Failed", exit_code=EXIT_PREEMPTED)  # each saved its emergency checkpoint
    c.pods.clear()
    p = c.step()
    s = c.status
    assert (s["attempt"], s["restarts"], s["preemptions"], s["failures"], s["groupGeneration"]) == (2, 1, 0, 0, 3)
    config = yaml.safe_load(p.replace_config["data"]["job.yaml"])
    assert config["spec"]["checkpoint"]["everySteps"] == 10
    c.set_pods(phase="Running")
    assert c.step().delete_pods == [] and c.status["phase"] == "Running"


def test_pods_of_a_deleted_job_of_the_same_name_are_waited_for_not_adopted():
    c = Cluster(job_body())
    c.predecessors = 2
    p = c.step()
    assert [m["kind"] for m in p.create if m["kind"] == "Pod"] == []
    assert "waiting for 2 pod(s) of a deleted TrainingJob" in c.status["message"]
    c.predecessors = 0
    p = c.step()
    assert [m["metadata"]["name"] for m in p.create if m["kind"] == "Pod"] == ["bert-0", "bert-1"]


def test_reports_of_a_predecessors_pods_are_not_this_jobs():
    from kubetrain_operator.handlers import JobRegistry

    jobs = JobRegistry()
    old = TrainerReport("finished", 1432, 1400, "s3://ckpt/runs/ml/bert/step-000001400")
    jobs.reports[("ml", "bert")]["pod-a"] = ("uid-old", PodReport(1, old))
    assert jobs.reports_of(("ml", "bert"), "uid-new") == []
    assert jobs.reports_of(("ml", "bert"), "uid-old") == [PodReport(1, old)]


PREFIX = "s3://ckpt/runs/ml/bert"


def test_when_every_checkpoint_is_gone_status_resets_to_scratch_with_a_warning():
    c = Cluster(job_body())
    running(c)
    c.step(live=Progress(1432, CheckpointRef(step=1400, uri=f"{PREFIX}/step-000001400")))
    assert (c.status["step"], c.status["lastCheckpoint"]["step"]) == (1432, 1400)
    c.step(live=Progress(3, None, {"step": 0, "checkpoint": None, "why": f"no complete checkpoint under {PREFIX}"}))
    s = c.status
    assert s["step"] == 3 and "lastCheckpoint" not in s
    assert s["startedFrom"] == {"attempt": 1, "step": 0, "why": f"no complete checkpoint under {PREFIX}", "changed": []}
    assert c.events[-1] == ("CheckpointsLost", f"attempt 1 started from scratch (no complete checkpoint under {PREFIX}); "
                            f"status had step 1432 and lastCheckpoint {PREFIX}/step-000001400: reset to step 0")


def test_a_checkpoint_the_fallback_skipped_does_not_stay_last_checkpoint():
    c = Cluster(job_body())
    c.reports = [PodReport(1, TrainerReport("preempted", 32, 32, f"{PREFIX}/step-000000032"))]
    running(c)
    assert c.status["lastCheckpoint"]["step"] == 32
    start = {"step": 30, "checkpoint": f"{PREFIX}/step-000000030", "why": "1 newer one(s) corrupt, skipped",
             "changed": ["training.learningRate 2e-05 -> 0.0001"]}
    c.set_pods(phase="Failed", exit_code=EXIT_PREEMPTED)
    c.step()
    c.pods.clear()
    c.step()
    c.set_pods(phase="Running")
    c.step()
    assert (c.status["attempt"], c.status["phase"]) == (2, "Running")
    c.step(live=Progress(31, None, start))
    s = c.status
    assert (s["step"], s["lastCheckpoint"]["step"], s["startedFrom"]["attempt"]) == (31, 30, 2)
    assert [e[0] for e in c.events[-2:]] == ["CheckpointsLost", "SettingsChanged"]
    assert c.events[-1][1] == (f"settings changed since {PREFIX}/step-000000030; the spec applies from step 30: "
                               "training.learningRate 2e-05 -> 0.0001")
    c.step(live=Progress(40, None, start))  # the old attempt's report of step 32 is history now
    assert (c.status["step"], c.status["lastCheckpoint"]["step"]) == (40, 30)


def test_a_report_arriving_after_the_job_failed_still_gives_its_last_checkpoint():
    c = Cluster(job_body())
    running(c)
    diverged = TrainerReport("failed", reason="Diverged", permanent=True, message="diverged: non-finite loss at step 3")
    c.pods["bert-1"] = observed_pod(c.pods["bert-1"], "Failed", exit_code=65, message=diverged.encode(), uid="a")
    c.step()
    assert c.status["phase"] == "Failed" and "lastCheckpoint" not in c.status
    with_checkpoint = TrainerReport("failed", 3, 2, f"{PREFIX}/step-000000002", reason="Diverged", permanent=True,
                                    message="diverged: non-finite loss at step 3")
    c.pods["bert-0"] = observed_pod(c.pods["bert-0"], "Failed", exit_code=65, message=with_checkpoint.encode(), uid="b")
    c.step()
    assert (c.status["phase"], c.status["lastCheckpoint"]["step"]) == ("Failed", 2)


PEER_LOST = TrainerReport("failed", reason="PeerLost", message="lost contact with another worker (RuntimeError: closed)")
S3_UNREACHABLE = TrainerReport("failed", reason="PodFailed", message="EndpointConnectionError: Could not connect to s3")


def test_a_peers_lost_contact_seen_first_gives_way_to_the_failed_pods_own_account():
    c = Cluster(job_body())
    running(c)
    lost, cause = PEER_LOST, S3_UNREACHABLE
    c.pods["bert-1"] = observed_pod(c.pods["bert-1"], "Failed", exit_code=1, message=lost.encode(), uid="a")
    c.step()
    assert c.status["phase"] == "Restarting" and c.status["message"].startswith("lost contact")
    c.pods["bert-0"] = observed_pod(c.pods["bert-0"], "Failed", exit_code=1, message=cause.encode(), uid="b")
    c.step()
    assert c.status["message"] == "EndpointConnectionError: Could not connect to s3 (pod bert-0, exit code 1)"
    both = Cluster(job_body())
    running(both)
    both.pods["bert-0"] = observed_pod(both.pods["bert-0"], "Failed", exit_code=1, message=lost.encode(), uid="c")
    both.pods["bert-1"] = observed_pod(both.pods["bert-1"], "Failed", exit_code=1, message=cause.encode(), uid="d")
    both.step()
    assert both.status["message"].startswith("EndpointConnectionError")


def test_a_peers_lost_contact_waits_a_little_for_the_failing_pod_to_give_its_own_account():
    """Seen in CI: both pods failed in the same instant; the operator read pod 0's "lost contact" while pod 1,
    the cause, still showed Running, deleted it, and its account (EndpointConnectionError) was never read: the
    job failed saying "lost contact". A symptom alone waits a little for the peer to end on its own."""
    c = Cluster(job_body())
    running(c)
    c.pods["bert-0"] = observed_pod(c.pods["bert-0"], "Failed", exit_code=1, message=PEER_LOST.encode(), uid="a",
                                    finished_at=c.now)
    c.now += timedelta(seconds=1)
    waiting = c.step()
    assert c.status["phase"] == "Running" and not waiting.delete_pods, "the peer's own account is still to come"
    assert waiting.requeue_after is not None and waiting.requeue_after <= 1.0
    c.now += timedelta(seconds=2)
    c.pods["bert-1"] = observed_pod(c.pods["bert-1"], "Failed", exit_code=1, message=S3_UNREACHABLE.encode(), uid="b",
                                    finished_at=c.now)
    c.step()
    assert c.status["phase"] == "Restarting"
    assert c.status["message"] == "EndpointConnectionError: Could not connect to s3 (pod bert-1, exit code 1)"
    # a peer that never ends (its node unreachable, say) is waited for only so long
    hung = Cluster(job_body())
    running(hung)
    hung.pods["bert-0"] = observed_pod(hung.pods["bert-0"], "Failed", exit_code=1, message=PEER_LOST.encode(), uid="c",
                                       finished_at=hung.now)
    hung.step()
    hung.now += timedelta(seconds=60)
    restarted = hung.step()
    assert hung.status["phase"] == "Restarting" and hung.status["message"].startswith("lost contact")
    assert {p["metadata"]["name"] for p in restarted.delete_pods} == {"bert-0", "bert-1"}


def test_the_failed_pods_own_account_counts_when_that_pod_was_gone_before_a_reconcile_listed_it():
    """Seen in CI: rank 0's "lost contact" was read first; the failed peer terminated and was deleted between
    two reconciles, so only its watch event carried why (EndpointConnectionError), and the job failed saying
    "lost contact"."""
    c = Cluster(job_body())
    running(c)
    lost, cause = PEER_LOST, S3_UNREACHABLE
    c.pods["bert-0"] = observed_pod(c.pods["bert-0"], "Failed", exit_code=1, message=lost.encode(), uid="a")
    c.step()
    assert c.status["message"].startswith("lost contact")
    peer = observed_pod(c.pods["bert-1"], "Failed", exit_code=1, message=cause.encode(), uid="b")
    c.reports = [PodReport.of(peer), PodReport.of(c.pods["bert-0"])]
    del c.pods["bert-1"]
    c.step()
    assert c.status["message"] == "EndpointConnectionError: Could not connect to s3 (pod bert-1, exit code 1)"
    c.gone()
    c.step()
    assert c.status["phase"] == "Pending" and c.status["attempt"] == 2
    assert c.events[-1][1].endswith("PodFailed: EndpointConnectionError: Could not connect to s3 (pod bert-1, exit code 1)")
    # the next attempt's own failure is not explained by the last attempt's report
    c.set_pods(phase="Running")
    c.step()
    for name in c.pods:
        c.pods[name] = observed_pod(c.pods[name], "Failed", exit_code=1, message=lost.encode(), uid=f"x-{name}")
    c.step()
    assert c.status["message"].startswith("lost contact")


def test_a_finished_report_with_an_exported_model_sets_status_output_once_with_an_event():
    c = Cluster(job_body(output={"uri": "s3://models/bert", "formats": ["hf", "onnx"]}))
    c.step()
    c.set_pods(phase="Running")
    c.step()
    output = {"uri": "s3://models/bert", "step": 120, "formats": ["hf", "onnx"], "metrics": {"eval_f1": 0.91}}
    report = TrainerReport("finished", 120, 120, "s3://ckpt/runs/ml/bert/step-000000120", output=output).encode()
    c.set_pods(phase="Succeeded", exit_code=0, message=report)
    c.step()
    assert c.status["phase"] == "Succeeded" and c.status["output"] == output
    exported = [m for r, m in c.events if r == "ModelExported"]
    assert exported == ["model exported to s3://models/bert at step 120 (hf, onnx)"]


def test_a_local_output_path_goes_beside_the_checkpoints_in_a_cluster_or_is_invalid_without_defaults():
    body = job_body(output={"uri": "models/bert"})
    with pytest.raises(SpecError, match=r"spec.output.uri: 'models/bert' is a local path"):
        builders.effective_job(parsed(body), builders.ClusterDefaults())
    job = builders.effective_job(parsed(body), builders.ClusterDefaults(checkpoint_uri="s3://default/ckpt"))
    assert job.spec.output.uri == "s3://default/ckpt/ml/bert/model"
    remote = builders.effective_job(parsed(job_body(output={"uri": "s3://mine/m"})), builders.ClusterDefaults())
    assert remote.spec.output.uri == "s3://mine/m"


def test_mlflow_credentials_reach_the_trainer_only_from_the_secret_and_the_attempt_is_in_its_env():
    body = job_body(tracking={"mlflow": {"trackingUri": "http://mlflow.mlflow:5000", "secret": "mlflow-creds"}})
    _, pods = builders.group(parsed(body), builders.owner_reference(body), 3)
    env = {e["name"]: e for e in pods[0]["spec"]["containers"][0]["env"]}
    assert env["KUBETRAIN_ATTEMPT"]["value"] == "3"
    for key in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-creds", "key": key, "optional": True}
    plain = builders.group(parsed(job_body()), builders.owner_reference(job_body()), 1)[1][0]
    assert not [e for e in plain["spec"]["containers"][0]["env"] if e["name"].startswith("MLFLOW")]


def test_status_progress_comes_from_the_trainers_metrics_and_reads_well():
    from kubetrain_operator.live_progress import parse_metrics, progress_from_metrics
    from kubetrain_operator.reconcile import human_duration

    text = ("# TYPE kubetrain_train_step gauge\nkubetrain_train_step 420\n"
            "# TYPE kubetrain_train_total_steps gauge\nkubetrain_train_total_steps 1000\n"
            "# TYPE kubetrain_eta_seconds gauge\nkubetrain_eta_seconds 3930.5\n"
            "# TYPE kubetrain_tokens_per_second gauge\nkubetrain_tokens_per_second 123456.7\n"
            "# TYPE kubetrain_eval_metric gauge\nkubetrain_eval_metric{metric=\"eval_f1\"} 0.912345\n")
    live = progress_from_metrics(parse_metrics(text), PREFIX)
    assert (live.step, live.total_steps, live.eval) == (420, 1000, {"eval_f1": 0.912345})
    c = Cluster(job_body())
    c.step()
    c.set_pods(phase="Running")
    c.step(live=live)
    assert c.status["progress"] == {"totalSteps": 1000, "percent": "42%", "eta": "1h05m", "tokensPerSecond": 123000.0,
                                    "eval": {"eval_f1": 0.9123}}
    assert [human_duration(s) for s in (0, 45, 750 // 2, 750, 3930)] == ["0s", "45s", "6m15s", "12m", "1h05m"]
    again = c.step(live=live)
    assert again.status is None  # the same progress patches nothing
    report = TrainerReport("finished", 1000, 1000, f"{PREFIX}/step-000001000").encode()
    c.set_pods(phase="Succeeded", exit_code=0, message=report)
    c.step()
    assert c.status["phase"] == "Succeeded" and c.status["progress"]["percent"] == "100%" and "eta" not in c.status["progress"]


def stuck(pod: dict, *, created: datetime, waiting: tuple[str, str] | None = None, unschedulable: str | None = None) -> dict:
    """A pending pod as the API shows one that cannot start: the kubelet's waiting reason, or the scheduler's."""
    pod = observed_pod(pod, "Pending", uid=pod["metadata"]["uid"],
                       conditions=[{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                    "message": unschedulable}] if unschedulable else None)
    pod["metadata"]["creationTimestamp"] = created.strftime("%Y-%m-%dT%H:%M:%SZ")
    if waiting:
        pod["status"]["containerStatuses"] = [{"name": "trainer", "state": {"waiting": {"reason": waiting[0],
                                                                                        "message": waiting[1]}}}]
    return pod


def test_a_group_that_cannot_start_says_why_and_fails_at_the_scheduling_timeout_without_counting_a_failure():
    c = Cluster(job_body(runPolicy={"backoffLimit": 3, "schedulingTimeoutSeconds": 120}))
    c.step()
    c.pods["bert-0"] = stuck(c.pods["bert-0"], created=c.now, waiting=(
        "ImagePullBackOff", 'Back-off pulling image "ghcr.io/example/trainer:1"'))
    c.pods["bert-1"] = stuck(c.pods["bert-1"], created=c.now, unschedulable="0/3 nodes are available: 3 Insufficient "
                             "nvidia.com/gpu.")
    c.now += timedelta(seconds=30)
    p = c.step()
    said = 'pod bert-0: ImagePullBackOff: Back-off pulling image "ghcr.io/example/trainer:1" (and 1 more pod(s))'
    waiting = next(x for x in c.status["conditions"] if x["type"] == "Waiting")
    assert (waiting["status"], waiting["reason"], waiting["message"]) == ("True", "ImagePullBackOff", said)
    assert c.status["phase"] == "Pending" and c.status["message"] == said
    assert c.events[-1] == ("ImagePullBackOff", said) and p.requeue_after is not None and p.requeue_after <= 90
    c.step()
    assert [e for e in c.events if e[0] == "ImagePullBackOff"] == [("ImagePullBackOff", said)], "said once"
    c.now += timedelta(seconds=91)
    p = c.step()
    assert c.status["phase"] == "Failed" and c.status["failures"] == 0 and c.status["restarts"] == 0
    failed = next(x for x in c.status["conditions"] if x["type"] == "Failed")
    assert failed["reason"] == "SchedulingTimeout"
    assert c.status["message"] == ("the group did not start within runPolicy.schedulingTimeoutSeconds (120s): " + said)
    assert {x["metadata"]["name"] for x in p.delete_pods} == {"bert-0", "bert-1"}


def test_the_suspend_policy_suspends_a_group_that_cannot_start_and_a_resume_tries_again():
    c = Cluster(job_body(runPolicy={"backoffLimit": 3, "schedulingTimeoutSeconds": 60,
                                    "schedulingTimeoutPolicy": "Suspend"}))
    c.step()
    for name in c.pods:
        c.pods[name] = stuck(c.pods[name], created=c.now, unschedulable="0/3 nodes are available: 3 Insufficient "
                             "nvidia.com/gpu.")
    c.now += timedelta(seconds=61)
    c.drop_spec_writes = True  # the first spec write is lost: the next reconcile writes it again, not a resume
    p = c.step()
    assert p.suspend_job and {x["metadata"]["name"] for x in p.delete_pods} == {"bert-0", "bert-1"}
    c.gone()
    c.drop_spec_writes = False
    p = c.step()
    assert p.suspend_job and not p.create and c.job["spec"]["runPolicy"]["suspend"] is True
    c.step()
    suspended = next(x for x in c.status["conditions"] if x["type"] == "Suspended")
    assert c.status["phase"] == "Suspended" and suspended["reason"] == "SchedulingTimeout"
    assert c.status["failures"] == 0 and c.status["restarts"] == 0
    assert c.status["message"].startswith("suspended: the group did not start within runPolicy.schedulingTimeoutSeconds "
                                          "(60s): pod bert-0: 0/3 nodes are available")
    assert [e for e in c.events if e[0] == "SchedulingTimeout"] == [("SchedulingTimeout", c.status["message"])]
    c.now += timedelta(hours=1)
    assert not c.step().create  # stays suspended, and says why
    c.edit_spec(runPolicy={**c.job["spec"]["runPolicy"], "suspend": False})  # the user tries again
    p = c.step()
    assert c.status["phase"] == "Pending" and c.status["attempt"] == 2
    assert sorted(m["metadata"]["name"] for m in p.create if m["kind"] == "Pod") == ["bert-0", "bert-1"]


def test_without_a_scheduling_timeout_a_stuck_group_waits_and_the_reason_clears_once_it_runs():
    c = Cluster(job_body())
    c.step()
    for name in c.pods:
        c.pods[name] = stuck(c.pods[name], created=c.now, unschedulable="0/3 nodes are available: 3 Insufficient memory.")
    c.step()
    assert c.status["message"] == "pod bert-0: 0/3 nodes are available: 3 Insufficient memory. (and 1 more pod(s))"
    c.now += timedelta(hours=10)
    c.step()
    assert c.status["phase"] == "Pending"
    c.set_pods(phase="Running")
    c.step()
    waiting = next(x for x in c.status["conditions"] if x["type"] == "Waiting")
    assert c.status["phase"] == "Running" and (waiting["status"], waiting["reason"]) == ("False", "PodsStarted")
    # an ordinary start (scheduled, pulling, creating) is not a problem worth a condition
    fresh = Cluster(job_body(name="fresh"))
    fresh.step()
    for name in fresh.pods:
        fresh.pods[name] = stuck(fresh.pods[name], created=fresh.now, waiting=("ContainerCreating", ""))
    fresh.step()
    assert not [x for x in fresh.status["conditions"] if x["type"] == "Waiting"]


def test_a_job_in_a_kueue_queue_has_each_attempts_pods_gated_as_one_group_and_waits_without_a_timeout():
    body = job_body(runPolicy={"backoffLimit": 3, "schedulingTimeoutSeconds": 60})
    body["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-gpus"}
    c = Cluster(body)
    c.step()
    for pod in c.pods.values():
        meta = pod["metadata"]
        assert meta["labels"]["kueue.x-k8s.io/queue-name"] == "team-gpus"
        assert meta["labels"]["kueue.x-k8s.io/pod-group-name"] == "bert-attempt-1"
        assert meta["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "2"
        assert pod["spec"]["schedulingGates"] == [{"name": "kueue.x-k8s.io/admission"}]
    for name in c.pods:
        c.pods[name]["metadata"]["creationTimestamp"] = c.now.strftime("%Y-%m-%dT%H:%M:%SZ")
    c.step()
    waiting = next(x for x in c.status["conditions"] if x["type"] == "Waiting")
    assert waiting["reason"] == "SchedulingGated" and "waiting for admission" in waiting["message"]
    assert c.events[-1][0] == "SchedulingGated"
    c.now += timedelta(hours=3)  # queued for hours: not a scheduling timeout
    c.step()
    assert c.status["phase"] == "Pending"
    # Kueue admits: the gates go, the group runs; an unlabelled job has no gate
    for pod in c.pods.values():
        pod["spec"].pop("schedulingGates")
    c.set_pods(phase="Running")
    c.step()
    assert c.status["phase"] == "Running"
    plain = Cluster(job_body())
    plain.step()
    assert all("schedulingGates" not in p["spec"] and "kueue.x-k8s.io/queue-name" not in p["metadata"]["labels"]
               for p in plain.pods.values())


# ---------------------------------------------------------------- gang scheduling (runPolicy.podGroupPolicy)

def test_coscheduling_places_each_attempt_as_one_pod_group_and_drops_the_previous_one():
    c = Cluster(job_body(runPolicy={"backoffLimit": 3, "podGroupPolicy": {"coscheduling": {"scheduleTimeoutSeconds": 120}}}))
    first = c.step()
    kinds = [m["kind"] for m in first.create]
    assert kinds.index("PodGroup") < kinds.index("Pod"), "the PodGroup exists before the pods naming it"
    group = c.pod_groups["bert-attempt-1"]
    assert group["apiVersion"] == "scheduling.x-k8s.io/v1alpha1"
    assert group["metadata"]["ownerReferences"][0]["uid"] == "uid-1234" and group["metadata"]["labels"][LABEL_JOB] == "bert"
    # minResources: each pod's requests (a request defaults to its limit) times the 2 pods
    assert group["spec"] == {"minMember": 2, "scheduleTimeoutSeconds": 120,
                             "minResources": {"cpu": "4", "memory": str(16 * 2**30), "nvidia.com/gpu": "2"}}
    for pod in c.pods.values():
        assert pod["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] == "bert-attempt-1"
        assert pod["spec"]["schedulerName"] == "scheduler-plugins-scheduler"
    c.set_pods(phase="Running")
    c.step()
    c.pods["bert-1"]["metadata"]["deletionTimestamp"] = "now"  # preempted
    c.step()
    c.set_pods(phase="Failed", exit_code=EXIT_PREEMPTED, deleting=True)
    c.step()
    c.gone()
    c.step()
    assert c.status["attempt"] == 2 and list(c.pod_groups) == ["bert-attempt-2"], c.pod_groups
    assert {p["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] for p in c.pods.values()} == {"bert-attempt-2"}
    plain = Cluster(job_body())
    plain.step()
    assert not plain.pod_groups and all("schedulerName" not in p["spec"] for p in plain.pods.values())


def test_volcano_groups_name_the_queue_and_a_scheduler_named_in_spec_pod_wins():
    c = Cluster(job_body(runPolicy={"podGroupPolicy": {"volcano": {"queue": "research"}}}, resources={},
                         pod={"schedulerName": "default-scheduler"}))
    c.step()
    group = c.pod_groups["bert-attempt-1"]
    assert group["apiVersion"] == "scheduling.volcano.sh/v1beta1"
    assert group["spec"] == {"minMember": 2, "queue": "research", "priorityClassName": "training"}
    for pod in c.pods.values():
        assert pod["metadata"]["annotations"]["scheduling.k8s.io/group-name"] == "bert-attempt-1"
        assert "scheduling.x-k8s.io/pod-group" not in pod["metadata"]["labels"]
        assert pod["spec"]["schedulerName"] == "default-scheduler"  # scheduler-plugins as the default profile


def test_a_pod_group_kind_the_cluster_does_not_serve_fails_the_job_before_any_pod():
    c = Cluster(job_body(runPolicy={"podGroupPolicy": {"coscheduling": {}}}))
    c.unserved = "runPolicy.podGroupPolicy: this cluster does not serve scheduling.x-k8s.io/v1alpha1 PodGroup"
    p = c.step()
    assert c.status["phase"] == "Failed" and not c.pods and not [m for m in p.create if m["kind"] == "Pod"]
    failed = next(x for x in c.status["conditions"] if x["type"] == "Failed")
    assert (failed["reason"], c.status["message"]) == ("PodGroupUnavailable", c.unserved)
    assert c.step().status is None, "reported once"


@pytest.mark.parametrize(("run_policy", "resources", "field"), [
    ({"podGroupPolicy": {}}, None, "podGroupPolicy"),
    ({"podGroupPolicy": {"coscheduling": {}, "volcano": {}}}, None, "podGroupPolicy"),
    ({"podGroupPolicy": {"volcano": {"queue": "Not A Queue"}}}, None, "queue"),
    ({}, {"limits": {"memory": "8 GB"}}, "resources.limits.memory"),
], ids=["neither", "both", "bad-queue", "bad-quantity"])
def test_a_bad_pod_group_policy_or_quantity_is_refused_naming_the_field(run_policy, resources, field):
    overrides = {"runPolicy": run_policy} | ({"resources": resources} if resources else {})
    with pytest.raises(SpecError, match=field):
        parsed(job_body(**overrides))
