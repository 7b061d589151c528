"""The dev-cluster API server (kubetrain_devcluster.apiserver) over real HTTP.

One server subprocess serves the module (as the dev cluster runs it); the kubernetes client, kubectl
and a real kopf operator talk to it. Each test works in its own namespace.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import pytest
import yaml
from kubernetes import client, config, watch
from kubernetes.client import ApiException

from kubetrain_devcluster.apiserver import serve
from kubetrain_testkit.kubeconfig import credentials
from kubetrain.ports import free_port
from kubetrain_testkit import REPO

ROOT = REPO
CRD_FILE = ROOT / "crds" / "trainingjob.yaml"
EXAMPLE = ROOT / "examples" / "trainingjob.yaml"
GROUP, VERSION, PLURAL = "kubetrain.io", "v1alpha1", "trainingjobs"


@dataclass
class Server:
    url: str
    kubeconfig: Path
    log_dir: Path
    proc: subprocess.Popen[str]


def start_server(tmp: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """Start the CLI on a free port and wait for its one ready line; it writes tmp/kubeconfig-<port> (a random token)."""
    port = free_port()
    stderr = (tmp / f"apiserver-{port}.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "kubetrain_devcluster.apiserver", "--port", str(port),
                             "--kubeconfig", str(tmp / f"kubeconfig-{port}"), *extra],
                            stdout=subprocess.PIPE, stderr=stderr, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    assert ready, "the API server did not start within 20 s"
    line = proc.stdout.readline().strip()  # type: ignore[union-attr]
    assert line == f"kubetrain apiserver listening on https://127.0.0.1:{port}"
    return proc, f"https://127.0.0.1:{port}"


def stop(proc: subprocess.Popen[Any], timeout: float = 10) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("apiserver")
    log_dir = tmp / "pod-logs"
    proc, url = start_server(tmp, "--log-dir", str(log_dir), "--crd", str(CRD_FILE))
    try:
        yield Server(url, tmp / f"kubeconfig-{url.rsplit(':', 1)[1]}", log_dir, proc)
    finally:
        assert stop(proc) == 0


@pytest.fixture(scope="module")
def api(server: Server) -> client.ApiClient:
    return config.new_client_from_config(str(server.kubeconfig))


@pytest.fixture(scope="module")
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture(scope="module")
def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


@pytest.fixture
def ns(core: client.CoreV1Api) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    return name


def tj(name: str, nodes: int = 2, **metadata: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingJob",
            "metadata": {"name": name, **metadata},
            "spec": {"nodes": nodes, "image": "img", "model": {"name": "m", "task": "sequence-classification"},
                     "data": {"train": "train.jsonl"}, "checkpoint": {"uri": "s3://b/c"}}}  # valid to the CRD's schema


def pod(name: str, labels: dict[str, str] | None = None, node: str | None = None, **metadata: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "main", "image": "img"}]}
    if node:
        spec["nodeName"] = node
    return {"metadata": {"name": name, "labels": labels or {}, **metadata}, "spec": spec}


def create_tj(custom: client.CustomObjectsApi, ns: str, body: dict[str, Any]) -> dict[str, Any]:
    return custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)


def get_tj(custom: client.CustomObjectsApi, ns: str, name: str) -> dict[str, Any]:
    return custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)


def http(server: Server, method: str, path: str, body: Any = None,
         content_type: str = "application/json") -> tuple[int, Any]:
    """A raw request; returns (status, parsed JSON or text)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    headers, tls = credentials(server.kubeconfig)
    req = urllib.request.Request(server.url + path, data=data, method=method, headers={"Content-Type": content_type, **headers})
    try:
        with urllib.request.urlopen(req, timeout=10, context=tls) as resp:
            status, raw = resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Poll until ``check`` returns something truthy (and return it)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        time.sleep(0.05)


def gone(fn: Callable[[], Any]) -> bool:
    try:
        fn()
    except ApiException as e:
        return e.status == 404
    return False


# --- objects and metadata -----------------------------------------------------------------------


def test_create_returns_object_with_server_metadata(custom: client.CustomObjectsApi, ns: str) -> None:
    created = create_tj(custom, ns, {**tj("job-a"), "status": {"phase": "Forged"}})
    meta = created["metadata"]
    assert meta["namespace"] == ns and meta["generation"] == 1
    assert meta["resourceVersion"].isdigit() and len(meta["uid"]) == 36
    assert meta["creationTimestamp"].endswith("Z")
    assert "status" not in created  # the status subresource: create ignores .status
    assert get_tj(custom, ns, "job-a") == created

    create_tj(custom, ns, tj("job-b"))
    listed = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)
    assert listed["kind"] == "TrainingJobList" and listed["apiVersion"] == f"{GROUP}/{VERSION}"
    assert [i["metadata"]["name"] for i in listed["items"]] == ["job-a", "job-b"]
    assert int(listed["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])


def test_names_conflicts_and_not_found(core: client.CoreV1Api, custom: client.CustomObjectsApi, ns: str) -> None:
    generated = core.create_namespaced_pod(ns, {"metadata": {"generateName": "worker-"}, "spec": {"containers": []}})
    name = generated.metadata.name
    assert name.startswith("worker-") and len(name) == len("worker-") + 5
    assert generated.status.phase == "Pending" and generated.spec.termination_grace_period_seconds == 30

    with pytest.raises(ApiException) as e:
        create_tj(custom, ns, tj("job"))
        create_tj(custom, ns, tj("job"))
    assert e.value.status == 409 and json.loads(e.value.body)["reason"] == "AlreadyExists"
    for bad in ({"metadata": {}}, {"metadata": {"name": "Not_A_Name"}}):
        with pytest.raises(ApiException) as e:
            core.create_namespaced_config_map(ns, bad)
        assert e.value.status == 422 and json.loads(e.value.body)["reason"] == "Invalid"
    with pytest.raises(ApiException) as e:
        get_tj(custom, ns, "missing")
    assert e.value.status == 404
    assert json.loads(e.value.body)["message"] == 'trainingjobs.kubetrain.io "missing" not found'
    with pytest.raises(ApiException) as e:
        core.create_namespaced_config_map("no-such-namespace", {"metadata": {"name": "x"}})
    assert e.value.status == 404


def test_label_and_field_selectors(core: client.CoreV1Api, ns: str) -> None:
    core.create_namespaced_pod(ns, pod("p1", {"app": "a", "tier": "x"}, node="node-1"))
    core.create_namespaced_pod(ns, pod("p2", {"app": "b"}))
    core.create_namespaced_pod(ns, pod("p3", {"app": "c", "tier": "y"}))
    core.patch_namespaced_pod_status("p3", ns, {"status": {"phase": "Running"}})

    def names(**kwargs: str) -> list[str]:
        return [p.metadata.name for p in core.list_namespaced_pod(ns, **kwargs).items]

    assert names(label_selector="app=a") == ["p1"]
    assert names(label_selector="app==b") == ["p2"]
    assert names(label_selector="app!=a") == ["p2", "p3"]
    assert names(label_selector="app in (a,c)") == ["p1", "p3"]
    assert names(label_selector="app notin (a)") == ["p2", "p3"]
    assert names(label_selector="tier") == ["p1", "p3"]
    assert names(label_selector="!tier") == ["p2"]
    assert names(label_selector="app in (a,c),tier=y") == ["p3"]
    assert names(field_selector="metadata.name=p2") == ["p2"]
    assert names(field_selector="status.phase=Running") == ["p3"]
    assert names(field_selector="spec.nodeName=node-1") == ["p1"]
    assert names(field_selector="status.phase!=Running,metadata.name!=p1") == ["p2"]

    other = f"{ns}-other"
    core.create_namespace({"metadata": {"name": other}})
    core.create_namespaced_pod(other, pod("p1", {"app": "a"}))
    assert names(label_selector="app=a") == ["p1"]  # only its own namespace
    everywhere = core.list_pod_for_all_namespaces(label_selector="app=a").items
    assert sorted((p.metadata.namespace, p.metadata.name) for p in everywhere) == [(ns, "p1"), (other, "p1")]


# --- writes ---------------------------------------------------------------------------------------


def test_merge_patch_json_patch_and_generation(custom: client.CustomObjectsApi, ns: str) -> None:
    base = tj("job")["spec"]
    created = create_tj(custom, ns, {**tj("job"), "spec": {**base, "nodeSelector": {"a": "1", "b": "2"}}})
    labelled = custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "job",
                                                     {"metadata": {"labels": {"team": "nlp"}}})
    assert labelled["metadata"]["generation"] == 1  # metadata changes do not count
    assert int(labelled["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])

    patched = custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "job",
                                                    {"spec": {"nodes": 4, "nodeSelector": {"a": None}}})
    assert patched["spec"] == {**base, "nodes": 4, "nodeSelector": {"b": "2"}}
    assert patched["metadata"]["generation"] == 2 and patched["metadata"]["labels"] == {"team": "nlp"}

    ops = [{"op": "replace", "path": "/spec/nodes", "value": 8}, {"op": "add", "path": "/spec/nodeSelector/c", "value": "3"},
           {"op": "remove", "path": "/metadata/labels/team"}]
    jsonpatched = custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "job", ops,
                                                        _content_type="application/json-patch+json")
    assert jsonpatched["spec"]["nodes"] == 8 and jsonpatched["spec"]["nodeSelector"] == {"b": "2", "c": "3"}
    assert jsonpatched["metadata"]["labels"] == {} and jsonpatched["metadata"]["generation"] == 3

    noop = custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "job", {"spec": {"nodes": 8}})
    assert noop["metadata"]["resourceVersion"] == jsonpatched["metadata"]["resourceVersion"]


def test_put_and_patch_conflict_on_stale_resource_version(custom: client.CustomObjectsApi, ns: str) -> None:
    created = create_tj(custom, ns, tj("job"))
    stale_rv = created["metadata"]["resourceVersion"]
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, "job", {"status": {"phase": "Running"}})

    stale = {**created, "spec": {**created["spec"], "nodes": 5}}
    with pytest.raises(ApiException) as e:
        custom.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "job", stale)
    assert e.value.status == 409 and json.loads(e.value.body)["reason"] == "Conflict"
    with pytest.raises(ApiException) as e:
        custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "job",
                                              {"metadata": {"resourceVersion": stale_rv}, "spec": {"nodes": 5}})
    assert e.value.status == 409

    current = get_tj(custom, ns, "job")
    replaced = custom.replace_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "job", {**current, "spec": {**created["spec"], "nodes": 5}, "status": {"x": 1}})
    assert replaced["spec"] == {**created["spec"], "nodes": 5} and replaced["metadata"]["generation"] == 2
    assert replaced["status"] == {"phase": "Running"}  # PUT on the main resource keeps .status
    assert replaced["metadata"]["uid"] == created["metadata"]["uid"]
    assert replaced["metadata"]["creationTimestamp"] == created["metadata"]["creationTimestamp"]


def test_status_subresource_isolation(custom: client.CustomObjectsApi, ns: str) -> None:
    create_tj(custom, ns, tj("job"))
    main = custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "job",
                                                 {"spec": {"nodes": 3}, "status": {"phase": "Hacked"}})
    assert main["spec"]["nodes"] == 3 and "status" not in main
    status = custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, "job",
                                                          {"spec": {"nodes": 9}, "status": {"phase": "Running"}})
    assert status["status"] == {"phase": "Running"} and status["spec"]["nodes"] == 3
    assert status["metadata"]["generation"] == 2  # status writes never bump it
    fetched = custom.get_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, "job")
    assert fetched["status"] == {"phase": "Running"}


def test_strategic_merge_patch_merges_conditions_by_type(core: client.CoreV1Api, ns: str) -> None:
    """The executor's status patch must not drop the condition that an eviction added."""
    core.create_namespaced_pod(ns, pod("p", node="n1"))
    disruption = {"type": "DisruptionTarget", "status": "True"}
    core.patch_namespaced_pod_status("p", ns, {"status": {"conditions": [disruption]}})
    patched = core.patch_namespaced_pod_status(
        "p", ns, {"status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}})
    assert [(c.type, c.status) for c in patched.status.conditions] == [("DisruptionTarget", "True"), ("Ready", "True")]
    patched = core.patch_namespaced_pod("p", ns, {"metadata": {"finalizers": ["a"]}})
    patched = core.patch_namespaced_pod("p", ns, {"metadata": {"finalizers": ["b"]}})
    assert patched.metadata.finalizers == ["a", "b"]


# --- deletion -------------------------------------------------------------------------------------


def test_graceful_pod_deletion_is_two_step(core: client.CoreV1Api, ns: str) -> None:
    core.create_namespaced_pod(ns, pod("bound", node="node-1"))
    first = core.delete_namespaced_pod("bound", ns)
    assert first.metadata.deletion_timestamp is not None and first.metadata.deletion_grace_period_seconds == 30
    still = core.read_namespaced_pod("bound", ns)
    assert still.metadata.deletion_grace_period_seconds == 30
    shorter = core.delete_namespaced_pod("bound", ns, grace_period_seconds=5)
    assert shorter.metadata.deletion_grace_period_seconds == 5

    with pytest.raises(ApiException) as e:
        core.delete_namespaced_pod("bound", ns, body=client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=client.V1Preconditions(uid="not-the-uid")))
    assert e.value.status == 409
    core.delete_namespaced_pod("bound", ns, grace_period_seconds=0)
    assert gone(lambda: core.read_namespaced_pod("bound", ns))

    core.create_namespaced_pod(ns, pod("unbound"))
    core.delete_namespaced_pod("unbound", ns)
    assert gone(lambda: core.read_namespaced_pod("unbound", ns))


def test_finalizers_hold_deletion_until_removed(custom: client.CustomObjectsApi, ns: str) -> None:
    create_tj(custom, ns, tj("job", finalizers=["kubetrain.io/cleanup"]))
    marked = custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "job")
    assert marked["metadata"]["deletionTimestamp"]
    assert get_tj(custom, ns, "job")["metadata"]["finalizers"] == ["kubetrain.io/cleanup"]
    custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "job", {"metadata": {"finalizers": None}})
    assert gone(lambda: get_tj(custom, ns, "job"))


def test_delete_collection_by_label(core: client.CoreV1Api, ns: str) -> None:
    for name, group in (("a1", "a"), ("a2", "a"), ("b1", "b")):
        core.create_namespaced_config_map(ns, {"metadata": {"name": name, "labels": {"g": group}}})
    core.delete_collection_namespaced_config_map(ns, label_selector="g=a")
    assert [c.metadata.name for c in core.list_namespaced_config_map(ns).items] == ["b1"]


def test_eviction_marks_disruption_target_and_deletes_gracefully(core: client.CoreV1Api, ns: str) -> None:
    core.create_namespaced_pod(ns, pod("victim", node="node-1"))
    core.create_namespaced_pod_eviction("victim", ns, {"apiVersion": "policy/v1", "kind": "Eviction",
                                                       "metadata": {"name": "victim", "namespace": ns}})
    evicted = core.read_namespaced_pod("victim", ns)
    conditions = {c.type: c for c in evicted.status.conditions}
    assert conditions["DisruptionTarget"].status == "True"
    assert conditions["DisruptionTarget"].reason == "EvictionByEvictionAPI"
    assert evicted.metadata.deletion_timestamp is not None and evicted.metadata.deletion_grace_period_seconds == 30


def test_owner_deletion_garbage_collects_dependents(core: client.CoreV1Api, custom: client.CustomObjectsApi,
                                                    ns: str) -> None:
    owner = create_tj(custom, ns, tj("owner"))
    ref = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainingJob", "name": "owner",
           "uid": owner["metadata"]["uid"], "controller": True}
    core.create_namespaced_service(ns, {"metadata": {"name": "svc", "ownerReferences": [ref]},
                                        "spec": {"clusterIP": "None"}})
    core.create_namespaced_pod(ns, pod("worker", ownerReferences=[ref]))
    core.create_namespaced_pod(ns, pod("running", node="node-1", ownerReferences=[ref]))
    core.create_namespaced_config_map(ns, {"metadata": {"name": "unrelated"}})

    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "owner")
    eventually(lambda: gone(lambda: core.read_namespaced_service("svc", ns)))
    eventually(lambda: gone(lambda: core.read_namespaced_pod("worker", ns)))
    running = eventually(lambda: core.read_namespaced_pod("running", ns).metadata.deletion_timestamp)
    assert running  # a bound pod is deleted gracefully: the executor finishes it
    assert core.read_namespaced_config_map("unrelated", ns).metadata.name == "unrelated"


def test_namespace_deletion_removes_everything_in_it(core: client.CoreV1Api, custom: client.CustomObjectsApi,
                                                     server: Server, ns: str) -> None:
    create_tj(custom, ns, tj("job"))
    core.create_namespaced_config_map(ns, {"metadata": {"name": "cm"}})
    status, deleting = http(server, "DELETE", f"/api/v1/namespaces/{ns}")  # the client reads a V1Status
    assert status == 200 and deleting["status"]["phase"] == "Terminating"
    eventually(lambda: gone(lambda: core.read_namespace(ns)))
    assert custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"] == []
    assert core.list_namespaced_config_map(ns).items == []


# --- CRDs, watch, logs, faults ---------------------------------------------------------------------


def test_crd_registered_through_the_api_is_served_then_removed(api: client.ApiClient, server: Server) -> None:
    ext = client.ApiextensionsV1Api(api)
    custom = client.CustomObjectsApi(api)
    crd = {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": "widgets.example.com"},
           "spec": {"group": "example.com", "scope": "Cluster",
                    "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
                    "versions": [{"name": "v1", "served": True, "storage": True,
                                  "schema": {"openAPIV3Schema": {"type": "object"}}}]}}
    created = ext.create_custom_resource_definition(crd)
    assert {c.type for c in created.status.conditions} >= {"Established", "NamesAccepted"}

    status, discovery = http(server, "GET", "/apis/example.com/v1")
    assert status == 200
    (widgets,) = discovery["resources"]
    assert (widgets["name"], widgets["kind"], widgets["namespaced"], widgets["shortNames"]) == (
        "widgets", "Widget", False, ["wd"])
    widget = custom.create_cluster_custom_object("example.com", "v1", "widgets",
                                                 {"apiVersion": "example.com/v1", "kind": "Widget",
                                                  "metadata": {"name": "w1"}, "spec": {"size": 3}})
    assert "namespace" not in widget["metadata"]
    listed = custom.list_cluster_custom_object("example.com", "v1", "widgets")
    assert [w["metadata"]["name"] for w in listed["items"]] == ["w1"]

    ext.delete_custom_resource_definition("widgets.example.com")
    assert http(server, "GET", "/apis/example.com/v1")[0] == 404
    with pytest.raises(ApiException) as e:
        custom.list_cluster_custom_object("example.com", "v1", "widgets")
    assert e.value.status == 404


def test_watch_replays_from_resource_version_and_streams_live(core: client.CoreV1Api, ns: str) -> None:
    since = core.list_namespaced_config_map(ns).metadata.resource_version
    core.create_namespaced_config_map(ns, {"metadata": {"name": "cm", "labels": {"w": "yes"}}, "data": {"k": "1"}})
    core.patch_namespaced_config_map("cm", ns, {"data": {"k": "2"}})
    core.delete_namespaced_config_map("cm", ns)
    started = time.monotonic()
    replay = [(e["type"], e["object"].metadata.name, (e["object"].data or {}).get("k")) for e in watch.Watch().stream(
        core.list_namespaced_config_map, ns, resource_version=since, timeout_seconds=1)]
    assert replay == [("ADDED", "cm", "1"), ("MODIFIED", "cm", "2"), ("DELETED", "cm", "2")]
    assert time.monotonic() - started < 5  # timeoutSeconds ended the stream

    seen: list[tuple[str, str]] = []
    watcher = watch.Watch()

    def consume() -> None:
        for event in watcher.stream(core.list_namespaced_config_map, ns, label_selector="w=yes", timeout_seconds=5):
            seen.append((event["type"], event["object"].metadata.name))
            if len(seen) == 4:
                watcher.stop()

    thread = threading.Thread(target=consume)
    thread.start()
    time.sleep(0.3)
    core.create_namespaced_config_map(ns, {"metadata": {"name": "ignored"}})
    core.create_namespaced_config_map(ns, {"metadata": {"name": "live", "labels": {"w": "yes"}}})
    core.patch_namespaced_config_map("live", ns, {"data": {"k": "v"}})
    core.patch_namespaced_config_map("live", ns, {"metadata": {"labels": {"w": "no"}}})  # leaves the selector
    core.patch_namespaced_config_map("live", ns, {"metadata": {"labels": {"w": "yes"}}})  # and comes back
    thread.join(10)
    assert seen == [("ADDED", "live"), ("MODIFIED", "live"), ("DELETED", "live"), ("ADDED", "live")]


def test_pod_logs_come_from_the_log_dir(core: client.CoreV1Api, server: Server, ns: str) -> None:
    created = core.create_namespaced_pod(ns, pod("logger", node="node-1"))
    with pytest.raises(ApiException) as e:
        core.read_namespaced_pod_log("logger", ns)
    assert e.value.status == 400  # not started yet
    log_file = server.log_dir / ns / f"logger_{created.metadata.uid}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    log_file.write_text("step 1\nstep 2\nstep 3\n")
    assert core.read_namespaced_pod_log("logger", ns) == "step 1\nstep 2\nstep 3\n"
    assert core.read_namespaced_pod_log("logger", ns, tail_lines=1) == "step 3\n"


def test_fault_injection(core: client.CoreV1Api, server: Server, ns: str) -> None:
    core.create_namespaced_config_map(ns, {"metadata": {"name": "cm"}})
    fault = {"status": 500, "count": 2, "methods": ["GET"], "pathRegex": f"/namespaces/{ns}/configmaps/cm$"}
    status, armed = http(server, "POST", "/_kubetrain/faults", fault)
    assert status == 201 and armed["count"] == 2
    for _ in range(2):
        with pytest.raises(ApiException) as e:
            core.read_namespaced_config_map("cm", ns)
        assert e.value.status == 500
    assert core.read_namespaced_config_map("cm", ns).metadata.name == "cm"

    http(server, "POST", "/_kubetrain/faults", {"status": 409, "count": 5, "methods": ["PATCH"], "pathRegex": ns})
    with pytest.raises(ApiException) as e:
        core.patch_namespaced_config_map("cm", ns, {"data": {"a": "b"}})
    assert e.value.status == 409
    assert core.read_namespaced_config_map("cm", ns).data is None  # the failed request had no effect
    assert http(server, "DELETE", "/_kubetrain/faults") == (200, {"faults": [], "spent": []})
    assert core.patch_namespaced_config_map("cm", ns, {"data": {"a": "b"}}).data == {"a": "b"}

    # "for a while": every matching request fails until the time is up, then the hits stay readable
    http(server, "POST", "/_kubetrain/faults", {"status": 503, "seconds": 1.0, "methods": ["GET"], "pathRegex": "/cm$"})
    for _ in range(3):
        with pytest.raises(ApiException) as e:
            core.read_namespaced_config_map("cm", ns)
        assert e.value.status == 503
    time.sleep(1.1)
    assert core.read_namespaced_config_map("cm", ns).data == {"a": "b"}
    status, faults = http(server, "GET", "/_kubetrain/faults")
    assert faults["faults"] == [] and [f["hits"] for f in faults["spent"]] == [3]


def test_errors_are_kubernetes_status_objects(server: Server, custom: client.CustomObjectsApi, ns: str) -> None:
    create_tj(custom, ns, tj("job"))
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"
    cases = [
        ("PUT", path, {}, "application/json", 405, "MethodNotAllowed"),
        ("PATCH", f"{path}/job", {"spec": {}}, "application/apply-patch+yaml", 415, "UnsupportedMediaType"),
        ("PATCH", f"{path}/job", {"spec": {}}, "application/strategic-merge-patch+json", 415, "UnsupportedMediaType"),
        ("GET", f"/apis/{GROUP}/{VERSION}/nothings", None, "application/json", 404, "NotFound"),
        ("GET", f"/api/v1/namespaces/{ns}/pods?labelSelector=a+in+(b", None, "application/json", 400, "BadRequest"),
    ]
    for method, url, body, content_type, code, reason in cases:
        status, answer = http(server, method, url, body, content_type)
        assert (status, answer["kind"], answer["code"], answer["reason"]) == (code, "Status", code, reason), url


def test_serve_in_process_and_watchers_that_hang_up_are_released() -> None:
    async def scenario() -> tuple[list[str], int, list[str], list[int], list[list[Any]]]:
        async with serve(port=0, crds=[CRD_FILE]) as running, aiohttp.ClientSession() as session:
            async with session.get(f"{running.url}/apis/{GROUP}/{VERSION}") as resp:
                resources = [r["name"] for r in (await resp.json())["resources"]]
            async with session.post(f"{running.url}/api/v1/namespaces/default/pods",
                                    json=pod("p", {"a": "b"})) as resp:
                created = resp.status
            names = [key[2] for key in running.emulator.objects.keys()]

            bus = running.emulator._buses[kmock.resource("", "v1", "pods")]
            consumers = []
            async with session.get(f"{running.url}/api/v1/namespaces/default/pods?watch=true") as resp:
                assert json.loads(await resp.content.readline())["type"] == "ADDED"
                consumers.append(bus.consumer_count)
            for _ in range(50):  # the client hung up: the server-side watch must end
                if bus.consumer_count == 0:
                    break
                await asyncio.sleep(0.02)
            consumers.append(bus.consumer_count)

            running.emulator.event_window = 2  # before the first configmap event: its log keeps 2
            cms = f"{running.url}/api/v1/namespaces/default/configmaps"
            rvs = []
            for name in ("a", "b", "c"):
                async with session.post(cms, json={"metadata": {"name": name}}) as resp:
                    rvs.append((await resp.json())["metadata"]["resourceVersion"])
            errors = []
            for since in (int(rvs[0]) - 1, rvs[0], "999999"):  # needs a's event (gone); b's and c's; future
                async with session.get(f"{cms}?watch=true&timeoutSeconds=1&resourceVersion={since}") as resp:
                    errors.append([json.loads(line) for line in (await resp.text()).splitlines()])
        return resources, created, names, consumers, errors

    resources, created, names, consumers, errors = asyncio.run(scenario())
    assert sorted(resources) == ["trainingjobs", "trainingjobs/status"]
    assert created == 201 and "p" in names
    assert consumers == [1, 0]
    too_old, caught_up, too_new = errors
    assert [(e["type"], e["object"]["code"], e["object"]["reason"]) for e in too_old] == [("ERROR", 410, "Expired")]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in caught_up] == [("ADDED", "b"), ("ADDED", "c")]
    assert [e["object"]["code"] for e in too_new] == [410]


def test_cli_exits_cleanly_on_sigterm_with_a_watch_open(tmp_path: Path) -> None:
    proc, url = start_server(tmp_path)
    headers, tls = credentials(tmp_path / f"kubeconfig-{url.rsplit(':', 1)[1]}")
    with urllib.request.urlopen(urllib.request.Request(f"{url}/api/v1/namespaces/default", headers=headers), timeout=5,
                                context=tls) as resp:
        assert json.loads(resp.read())["status"]["phase"] == "Active"
    stream = urllib.request.urlopen(urllib.request.Request(f"{url}/api/v1/namespaces?watch=true", headers=headers), timeout=10,
                                    context=tls)
    assert json.loads(stream.readline())["object"]["metadata"]["name"] == "default"
    started = time.monotonic()
    assert stop(proc) == 0
    assert time.monotonic() - started < 5
    assert stream.read() == b""  # the server ended the stream
    stream.close()


# --- kubectl and kopf ------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl binary on PATH")
def test_kubectl_apply_get_delete(server: Server, core: client.CoreV1Api, tmp_path: Path, ns: str) -> None:
    def kubectl(*args: str, warnings: bool = False) -> str:
        result = subprocess.run(["kubectl", "--kubeconfig", str(server.kubeconfig), "--cache-dir", str(tmp_path),
                                 *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert warnings or "Warning" not in result.stderr, result.stderr
        return result.stdout

    # The server registered this CRD at start (--crd), so kubectl warns that it lacks its annotation.
    applied = kubectl("apply", "-f", str(CRD_FILE), warnings=True)
    assert applied.strip() == "customresourcedefinition.apiextensions.k8s.io/trainingjobs.kubetrain.io configured"
    assert kubectl("apply", "-n", ns, "-f", str(EXAMPLE)).strip() == "trainingjob.kubetrain.io/sentiment-minilm created"
    header, row = kubectl("get", "-n", ns, "tj").splitlines()
    assert header.split() == ["NAME", "PHASE", "NODES", "STEP", "PROGRESS", "ETA", "RESTARTS", "OUTPUT", "AGE"]
    assert row.split()[:2] == ["sentiment-minilm", "2"]
    listed = yaml.safe_load(kubectl("get", "-n", ns, "trainingjobs", "-o", "yaml"))
    assert [(i["kind"], i["spec"]["model"]["task"]) for i in listed["items"]] == [
        ("TrainingJob", "sequence-classification")]

    core.create_namespaced_pod(ns, pod("x", {"a": "b"}, node="node-1"))
    core.create_namespaced_pod(ns, pod("y", {"a": "c"}))
    assert [line.split()[0] for line in kubectl("get", "-n", ns, "pods", "-l", "a=b").splitlines()] == ["NAME", "x"]
    # kubectl 1.37 names the namespace when it is not the kubeconfig's (where the environment decides that)
    assert kubectl("delete", "-n", ns, "pod", "x", "--wait=false").strip() in ('pod "x" deleted',
                                                                            f'pod "x" deleted from {ns} namespace')
    assert core.read_namespaced_pod("x", ns).metadata.deletion_timestamp is not None  # graceful
    assert "Terminating" in kubectl("get", "-n", ns, "pod", "x")
    deleted = kubectl("delete", "-n", ns, "tj", "sentiment-minilm").strip()
    assert deleted in ('trainingjob.kubetrain.io "sentiment-minilm" deleted',
                       f'trainingjob.kubetrain.io "sentiment-minilm" deleted from {ns} namespace')
    assert "No resources found" in subprocess.run(
        ["kubectl", "--kubeconfig", str(server.kubeconfig), "--cache-dir", str(tmp_path), "get", "-n", ns, "tj"],
        capture_output=True, text=True, timeout=30).stderr


KOPF_OPERATOR = """
import pathlib
import kopf

SEEN = pathlib.Path(__file__).with_name("pods-seen.txt")

@kopf.on.startup()
def configure(settings, **_):
    settings.watching.server_timeout = 30

@kopf.on.create("kubetrain.io", "v1alpha1", "trainingjobs")
def created(body, spec, patch, **_):
    patch.status["phase"] = "Pending"  # what the CRD's status schema allows
    patch.status["step"] = spec["nodes"]
    kopf.info(body, reason="Seen", message="a k8s Event posted by kopf")

@kopf.on.delete("kubetrain.io", "v1alpha1", "trainingjobs")
def deleted(name, **_):
    SEEN.with_name("deleted.txt").write_text(name)

@kopf.on.event("", "v1", "pods", labels={"kubetrain.io/test": "kopf"})
def pod_event(name, **_):
    with SEEN.open("a") as f:
        f.write(name + "\\n")
"""


def test_kopf_operator_reacts_to_trainingjobs_and_pods(server: Server, core: client.CoreV1Api,
                                                       custom: client.CustomObjectsApi, tmp_path: Path) -> None:
    script = tmp_path / "operator.py"
    script.write_text(textwrap.dedent(KOPF_OPERATOR))
    log = (tmp_path / "kopf.log").open("w")
    env = {**os.environ, "KUBECONFIG": str(server.kubeconfig)}
    proc = subprocess.Popen([sys.executable, "-m", "kopf", "run", "--standalone", "--namespace", "default",
                             str(script)], env=env, stdout=log, stderr=subprocess.STDOUT)
    name = f"kopf-{uuid.uuid4().hex[:6]}"
    try:
        create_tj(custom, "default", tj(name, nodes=3))
        status = eventually(lambda: get_tj(custom, "default", name).get("status"), timeout=20)
        assert status == {"phase": "Pending", "step": 3}, (tmp_path / "kopf.log").read_text()
        posted = eventually(lambda: core.list_namespaced_event(
            "default", field_selector=f"involvedObject.name={name}").items)
        assert [(e.reason, e.message) for e in posted] == [("Seen", "a k8s Event posted by kopf")]

        core.create_namespaced_pod("default", pod(f"{name}-other", {"kubetrain.io/test": "no"}))
        core.create_namespaced_pod("default", pod(f"{name}-pod", {"kubetrain.io/test": "kopf"}))
        seen = tmp_path / "pods-seen.txt"
        eventually(lambda: seen.exists() and f"{name}-pod" in seen.read_text(), timeout=10)
        assert f"{name}-other" not in seen.read_text()

        # kopf put its finalizer on the job (it has a delete handler): deletion waits for the handler
        assert get_tj(custom, "default", name)["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
        assert custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, name)["metadata"][
            "deletionTimestamp"]
        eventually(lambda: gone(lambda: get_tj(custom, "default", name)), timeout=10)
        assert (tmp_path / "deleted.txt").read_text() == name
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for obj in (f"{name}-other", f"{name}-pod"):
            with_ignored_404(lambda: core.delete_namespaced_pod(obj, "default", grace_period_seconds=0))
        with_ignored_404(lambda: custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, name))


def with_ignored_404(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except ApiException as e:
        if e.status != 404:
            raise


def raw_status(url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None,
               tls=None) -> int:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=tls) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_only_the_kubeconfigs_token_a_loopback_host_and_json_bodies_get_in(server: Server, core: client.CoreV1Api) -> None:
    """A browser page can reach loopback: a text/plain POST (no CORS preflight) or a rebound host name must not
    create a pod whose command the executor would run; nor may a request without the server's random token."""
    pods_url = f"{server.url}/api/v1/namespaces/default/pods"
    body = json.dumps(pod("from-a-web-page")).encode()
    token, tls = credentials(server.kubeconfig)
    assert "admin." in token["Authorization"] and len(token["Authorization"]) > 30, "a random token, not a fixed one"
    assert raw_status(pods_url, "POST", body, {"Content-Type": "application/json"}, tls=tls) == 401
    assert raw_status(pods_url, "POST", body, {"Content-Type": "application/json",
                                               "Authorization": "Bearer kubetrain-dev-token"}, tls=tls) == 401
    assert raw_status(pods_url, "POST", body, {"Content-Type": "text/plain", "Origin": "http://evil.example",
                                               **token}, tls=tls) == 415
    assert raw_status(pods_url, "POST", body, {"Content-Type": "application/json", "Host": "evil.example", **token},
                      tls=tls) == 403
    assert raw_status(pods_url, headers={"Host": "rebound.evil.example:80", **token}, tls=tls) == 403
    assert "from-a-web-page" not in [p.metadata.name for p in core.list_namespaced_pod("default").items]
    assert raw_status(f"{server.url}/healthz", tls=tls) == 200
    assert raw_status(pods_url, headers=token, tls=tls) == 200
    assert raw_status(pods_url, headers={"Host": f"localhost:{server.url.rsplit(':', 1)[1]}", **token}, tls=tls) == 200


def test_the_cli_refuses_to_start_without_tokens(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "kubetrain_devcluster.apiserver", "--port", "0"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "bearer tokens are required" in done.stderr


def test_a_leader_that_cannot_renew_its_lease_stops_and_the_standby_takes_over(server: Server, api: client.ApiClient,
                                                                               ns: str) -> None:
    """operator/leadership.py against the server's Leases: one of two candidates leads, the other waits;
    when the leader's renewals fail (the server refuses every PUT for 10 s) it gives up leading within its
    renew deadline -- before its Lease expires for the standby -- and the standby leads once it can."""
    from kubetrain_operator.leadership import LEASE_SECONDS, RENEW_DEADLINE_SECONDS, RETRY_SECONDS, Leadership

    leases = client.CoordinationV1Api(api)
    lost = {who: threading.Event() for who in ("a", "b")}
    a = Leadership(ns, "lead", "a", on_lost=lost["a"].set, api_client=api).start()
    assert a.leading.wait(10)
    b = Leadership(ns, "lead", "b", on_lost=lost["b"].set, api_client=api).start()
    time.sleep(2 * RETRY_SECONDS + 1)
    assert not b.leading.is_set() and leases.read_namespaced_lease("lead", ns).spec.holder_identity == "a"

    refused = time.monotonic()
    http(server, "POST", "/_kubetrain/faults", {"status": 503, "seconds": 10.0, "methods": ["PUT"],
                                                "pathRegex": f"/namespaces/{ns}/leases/lead$"})
    assert lost["a"].wait(RENEW_DEADLINE_SECONDS + 2 * RETRY_SECONDS)
    gave_up = time.monotonic() - refused
    assert not b.leading.is_set(), "the standby may not lead while the old leader might still act"
    assert gave_up < LEASE_SECONDS + RETRY_SECONDS
    assert b.leading.wait(20) and leases.read_namespaced_lease("lead", ns).spec.holder_identity == "b"
    assert not lost["b"].is_set()
    b.release()
    with pytest.raises(ApiException) as gone:
        leases.read_namespaced_lease("lead", ns)
    assert gone.value.status == 404
    http(server, "DELETE", "/_kubetrain/faults")


# --- the CRD's schema, enforced as kube-apiserver does (schema.py) -------------------------------


def test_a_trainingjob_against_the_crd_schema_gets_a_422_naming_every_bad_field(custom: client.CustomObjectsApi,
                                                                               ns: str) -> None:
    bad = tj("bad")
    bad["spec"].update(nodes=0, image=123, training={"precision": "fp8", "learningRate": "fast"})
    del bad["spec"]["data"]
    with pytest.raises(ApiException) as e:
        create_tj(custom, ns, bad)
    status = json.loads(e.value.body)
    assert (e.value.status, status["reason"]) == (422, "Invalid")
    causes = {c["field"]: c for c in status["details"]["causes"]}
    assert set(causes) == {"spec.nodes", "spec.image", "spec.training.precision", "spec.training.learningRate", "spec.data"}
    assert causes["spec.nodes"]["message"] == "Invalid value: 0: spec.nodes in body should be greater than or equal to 1"
    assert causes["spec.image"]["message"] == 'Invalid value: "integer": spec.image in body must be of type string: "integer"'
    assert causes["spec.training.precision"]["message"].startswith('Unsupported value: "fp8": supported values: ')
    assert causes["spec.data"] == {"reason": "FieldValueRequired", "message": "Required value", "field": "spec.data"}
    assert status["message"].startswith('TrainingJob.kubetrain.io "bad" is invalid: [')
    assert "spec.nodes: Invalid value: 0: spec.nodes in body should be" in status["message"]
    assert status["details"]["kind"] == "TrainingJob" and status["details"]["group"] == "kubetrain.io"
    with pytest.raises(ApiException):
        get_tj(custom, ns, "bad")  # nothing stored

    create_tj(custom, ns, tj("good"))  # updates are checked too, the status subresource's included
    for write in (lambda: custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "good", {"spec": {"nodes": -1}}),
                  lambda: custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, "good",
                                                                       {"status": {"step": "ten"}})):
        with pytest.raises(ApiException) as e:
            write()
        assert e.value.status == 422
    assert get_tj(custom, ns, "good")["spec"]["nodes"] == 2


def test_unknown_fields_are_pruned_or_with_strict_field_validation_refused(server: Server, custom: client.CustomObjectsApi,
                                                                          ns: str) -> None:
    doc = tj("extra")
    doc["spec"]["gpus"] = 8
    doc["spec"]["training"] = {"epochs": 1, "turbo": True}
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"
    code, refused = http(server, "POST", f"{path}?fieldValidation=Strict", doc)
    assert code == 400 and refused["reason"] == "BadRequest"
    assert refused["message"] == 'strict decoding error: unknown field "spec.gpus", unknown field "spec.training.turbo"'
    stored = create_tj(custom, ns, doc)  # without Strict, as the server's default: dropped
    assert "gpus" not in stored["spec"] and stored["spec"]["training"] == {"epochs": 1}
    assert stored["spec"]["model"]["name"] == "m"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl binary on PATH")
def test_kubectl_apply_of_a_bad_spec_is_refused_at_apply_time(server: Server, tmp_path: Path, ns: str) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["nodes"] = "two"
    doc["spec"]["gpus"] = 8

    def apply(body: dict) -> subprocess.CompletedProcess:
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(body))
        return subprocess.run(["kubectl", "--kubeconfig", str(server.kubeconfig), "--cache-dir", str(tmp_path), "apply",
                               "-n", ns, "-f", str(tmp_path / "bad.yaml")], capture_output=True, text=True, timeout=30)

    result = apply(doc)
    assert result.returncode != 0, result.stdout
    assert 'unknown field "spec.gpus"' in result.stderr, result.stderr
    doc["spec"].pop("gpus")
    result = apply(doc)
    assert result.returncode != 0 and result.stderr.strip() == (
        'The TrainingJob "sentiment-minilm" is invalid: spec.nodes: Invalid value: "string": spec.nodes in body must be '
        'of type integer: "string"'), result.stderr
