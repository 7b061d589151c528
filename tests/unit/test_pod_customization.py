"""spec.pod: what a platform team adds to the trainer pods, passed through by the pure builders; what would break
the restricted pod or shadow the operator's own settings is refused, naming the field."""

from __future__ import annotations

import pytest

from kubetrain.api import SpecError, parse_training_job
from kubetrain.pod_spec import OPERATOR_ENV, OPERATOR_PATHS, OPERATOR_PREFIX, OPERATOR_VOLUMES
from kubetrain_operator import builders

CUSTOM = {
    "env": [{"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "key"}}},
            {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
    "envFrom": [{"configMapRef": {"name": "team-defaults"}, "prefix": "TEAM_"}],
    "volumes": [{"name": "datasets", "persistentVolumeClaim": {"claimName": "shared-data", "readOnly": True}},
                {"name": "certs", "secret": {"secretName": "corp-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"name": "notes", "configMap": {"name": "notes"}}, {"name": "cache", "emptyDir": {"sizeLimit": "20Gi"}}],
    "volumeMounts": [{"name": "datasets", "mountPath": "/data", "readOnly": True},
                     {"name": "certs", "mountPath": "/etc/ssl/corp"}, {"name": "notes", "mountPath": "/etc/notes"},
                     {"name": "cache", "mountPath": "/cache"}],
    "imagePullSecrets": ["registry-creds"],
    "serviceAccountName": "trainer",
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu.example.com/class", "operator": "In", "values": ["h200"]}]}]}},
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 50, "podAffinityTerm": {
            "labelSelector": {"matchLabels": {"team": "nlp"}}, "topologyKey": "kubernetes.io/hostname"}}]}},
    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                   "whenUnsatisfiable": "ScheduleAnyway"}],
    "schedulerName": "volcano",
    "labels": {"team": "nlp"},
    "annotations": {"cost-center": "4711"},
}


def job(pod: dict | None = None, **spec) -> dict:
    body = {"apiVersion": "kubetrain.io/v1alpha1", "kind": "TrainingJob",
            "metadata": {"name": "bert", "namespace": "ml", "uid": "u-1"},
            "spec": {"image": "ghcr.io/example/trainer:1", "nodes": 2,
                     "model": {"name": "roberta-base", "task": "sequence-classification"},
                     "data": {"train": "s3://data/train.jsonl"},
                     "checkpoint": {"uri": "s3://ckpt/runs", "s3Secret": "s3-creds"}, **spec}}
    if pod is not None:
        body["spec"]["pod"] = pod
    return body


def built(body: dict) -> dict:
    _, pods = builders.group(parse_training_job(body), builders.owner_reference(body), 1)
    return pods[1]


def test_spec_pod_reaches_every_trainer_pod_after_the_operators_own_settings():
    plain, custom = built(job()), built(job(CUSTOM))
    spec, container = custom["spec"], custom["spec"]["containers"][0]
    mine = plain["spec"]["containers"][0]
    assert container["env"][: len(mine["env"])] == mine["env"]  # the operator's first, then the user's
    assert container["env"][len(mine["env"]):] == CUSTOM["env"]
    assert container["envFrom"] == CUSTOM["envFrom"]
    assert container["volumeMounts"] == mine["volumeMounts"] + CUSTOM["volumeMounts"]
    assert spec["volumes"] == plain["spec"]["volumes"] + CUSTOM["volumes"]
    assert spec["imagePullSecrets"] == [{"name": "registry-creds"}] and spec["serviceAccountName"] == "trainer"
    assert spec["automountServiceAccountToken"] is False, "a token only when asked"
    assert spec["affinity"] == CUSTOM["affinity"] and spec["topologySpreadConstraints"] == CUSTOM["topologySpreadConstraints"]
    assert spec["schedulerName"] == "volcano"
    assert custom["metadata"]["labels"]["team"] == "nlp" and custom["metadata"]["labels"]["kubetrain.io/node-rank"] == "1"
    assert custom["metadata"]["annotations"]["cost-center"] == "4711"
    # restricted, whatever spec.pod says
    assert container["securityContext"] == mine["securityContext"] and spec["securityContext"] == plain["spec"]["securityContext"]
    asked = built(job({"serviceAccountName": "trainer", "automountServiceAccountToken": True}))
    assert asked["spec"]["automountServiceAccountToken"] is True
    # an edit of spec.pod is a spec change: the group restarts gracefully to apply it
    assert custom["metadata"]["annotations"]["kubetrain.io/spec-hash"] != plain["metadata"]["annotations"]["kubetrain.io/spec-hash"]


@pytest.mark.parametrize("pod, said", [
    ({"volumes": [{"name": "host", "hostPath": {"path": "/var/run"}}]}, "spec.pod.volumes[0].hostPath: Extra inputs are not permitted"),
    ({"volumes": [{"name": "v", "emptyDir": {}, "secret": {"secretName": "s"}}]}, "exactly one of"),
    ({"volumes": [{"name": "config", "emptyDir": {}}]}, "'config' is the operator's own volume"),
    ({"volumeMounts": [{"name": "nowhere", "mountPath": "/x"}]}, "'nowhere' names no volume"),
    ({"volumes": [{"name": "v", "emptyDir": {}}], "volumeMounts": [{"name": "v", "mountPath": "/tmp"}]}, "/tmp is"),
    ({"volumes": [{"name": "v", "emptyDir": {}}], "volumeMounts": [{"name": "v", "mountPath": "/etc"}]}, "/etc is (or holds)"),
    ({"volumes": [{"name": "v", "emptyDir": {}}], "volumeMounts": [{"name": "v", "mountPath": "/x", "subPath": "../.."}]},
     "may not hold '..'"),
    ({"env": [{"name": "KUBETRAIN_ATTEMPT", "value": "9"}]}, "KUBETRAIN_ATTEMPT is set by the operator"),
    ({"env": [{"name": "HOME", "value": "/root"}]}, "HOME is set by the operator"),
    ({"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "plain"}]}, "comes from checkpoint.s3Secret"),
    ({"env": [{"name": "X", "value": "a", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}, "exclusive"),
    ({"env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.containers"}}}]}, "fieldPath"),
    ({"labels": {"kubetrain.io/job-name": "other"}}, "is the operator's own"),
    ({"labels": {"team": "bad value!"}}, "is not a valid label"),
    ({"securityContext": {"privileged": True}}, "spec.pod.securityContext"),
    ({"imagePullSecrets": ["Not_A_Name"]}, "is not a Secret name"),
])
def test_what_would_break_the_restricted_pod_or_shadow_the_operator_is_refused_naming_the_field(pod, said):
    with pytest.raises(SpecError, match=r"spec(\.|: )pod") as err:
        parse_training_job(job(pod))
    assert said in str(err.value), str(err.value)


def test_the_reserved_names_are_the_ones_the_operator_sets():
    """If the builders start setting another env var, volume or mount path, spec.pod must refuse it too."""
    body = job(tracking={"mlflow": {"trackingUri": "http://mlflow:5000", "secret": "mlflow-creds"}})
    pod = built(body)
    container = pod["spec"]["containers"][0]
    credentials = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN",
                   "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    for var in container["env"]:
        assert var["name"] in OPERATOR_ENV | credentials or var["name"].startswith("KUBETRAIN_"), var
    assert {v["name"] for v in pod["spec"]["volumes"]} == OPERATOR_VOLUMES
    assert {m["mountPath"] for m in container["volumeMounts"]} | {container["terminationMessagePath"]} <= set(OPERATOR_PATHS)
    assert all(k.startswith(OPERATOR_PREFIX) for k in pod["metadata"]["annotations"])
    with pytest.raises(SpecError, match="MLFLOW_TRACKING_TOKEN comes from tracking.mlflow.secret"):
        parse_training_job({**body, "spec": {**body["spec"], "pod": {"env": [{"name": "MLFLOW_TRACKING_TOKEN", "value": "t"}]}}})
