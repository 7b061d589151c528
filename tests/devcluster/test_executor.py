"""The local pod executor (kubetrain_devcluster.executor).

Unit tests for its pure helpers, then end-to-end tests over real HTTP with real processes: the dev API
server and the executor run as subprocesses, pods are created with the kubernetes client, and the
tests assert what the processes saw and the status the executor wrote.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetrain_testkit import polling

from kubetrain_devcluster.dns import DnsPending, dns_table, parse_pod_dns_name, substitute_dns
from kubetrain_devcluster.apiclient import ApiClient
from kubetrain_testkit.kubeconfig import credentials
from kubetrain_devcluster.executor import ExecutorOptions, PodExecutor
from kubetrain_devcluster.ipam import IpAllocator
from kubetrain_devcluster.launch import LaunchContext, build_launch
from kubetrain_devcluster.machine import parse_quantity
from kubetrain_devcluster.podenv import ConfigError, PodFacts, expand_vars, resolve_env
from kubetrain_devcluster.podstatus import exit_code_and_signal, merge_conditions, termination_message
from kubetrain_devcluster.scheduling import pod_fits_node
from kubetrain_devcluster.volumes import PathRewriter, materialize_volumes, mount_paths
from kubetrain.ports import free_port
from kubetrain_testkit import REPO

# ==================================================================================================
# pure helpers


@pytest.mark.parametrize("text, expected", [
    ("$(A)", "a"),
    ("x$(A)y$(B)z", "xaybz"),
    ("$$(A)", "$(A)"),
    ("$$$(A)", "$a"),
    ("$(UNKNOWN)", "$(UNKNOWN)"),
    ("$(A", "$(A"),
    ("$A", "$A"),
    ("a$", "a$"),
    ("$()", "$()"),
    ("$(A)$(A)", "aa"),
    ("$$", "$"),
])
def test_expand_vars_follows_kubernetes_rules(text: str, expected: str) -> None:
    assert expand_vars(text, {"A": "a", "B": "b"}) == expected


def test_parse_quantity() -> None:
    assert parse_quantity("500m") == parse_quantity("0.5")
    assert parse_quantity("2Gi") == 2 * 1024**3
    assert parse_quantity("1k") == 1000
    assert parse_quantity("1e3") == 1000
    assert parse_quantity(4) == 4
    with pytest.raises(ValueError):
        parse_quantity("lots")


def test_pod_fits_node_selector_and_affinity() -> None:
    labels = {"pool": "cpu", "kubernetes.io/hostname": "local-1", "rank": "3"}
    assert pod_fits_node({}, "local-1", labels)
    assert pod_fits_node({"nodeSelector": {"pool": "cpu"}}, "local-1", labels)
    assert not pod_fits_node({"nodeSelector": {"pool": "gpu"}}, "local-1", labels)

    def affinity(*terms: dict[str, Any]) -> dict[str, Any]:
        return {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": list(terms)}}}}

    def expr(key: str, op: str, *values: str) -> dict[str, Any]:
        return {"matchExpressions": [{"key": key, "operator": op, "values": list(values)}]}

    assert pod_fits_node(affinity(expr("pool", "In", "gpu", "cpu")), "local-1", labels)
    assert not pod_fits_node(affinity(expr("pool", "NotIn", "cpu")), "local-1", labels)
    assert pod_fits_node(affinity(expr("zone", "DoesNotExist")), "local-1", labels)
    assert not pod_fits_node(affinity(expr("zone", "Exists")), "local-1", labels)
    assert pod_fits_node(affinity(expr("rank", "Gt", "2")), "local-1", labels)
    assert not pod_fits_node(affinity(expr("rank", "Lt", "2")), "local-1", labels)
    assert pod_fits_node(affinity(expr("zone", "Exists"), expr("pool", "Exists")), "local-1", labels)  # terms are ORed
    by_name = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["local-0"]}]}
    assert not pod_fits_node(affinity(by_name), "local-1", labels)
    assert pod_fits_node(affinity(by_name), "local-0", labels)


def test_path_rewriter_on_path_boundaries_longest_first() -> None:
    rewrite = PathRewriter({"/data": "/L/data", "/data/models": "/L/models", "/opt/app/": "/src/app", "/": "/nope"})
    assert rewrite("/data") == "/L/data"
    assert rewrite("/data/x.txt") == "/L/data/x.txt"
    assert rewrite("/data/models/m.bin") == "/L/models/m.bin"
    assert rewrite("/data/modelsX") == "/L/data/modelsX"
    assert rewrite("--config=/opt/app/cfg.yaml") == "--config=/src/app/cfg.yaml"
    assert rewrite("open('/data/a') and /data:/opt/app") == "open('/L/data/a') and /L/data:/src/app"
    assert rewrite("file:///data/a") == "file:///L/data/a"
    for untouched in ("/database", "/x/data", "./data", "data/x", "/data.json", "/etc/passwd"):
        assert rewrite(untouched) == untouched
    assert PathRewriter({})("/data") == "/data"


def test_parse_pod_dns_name_forms() -> None:
    assert parse_pod_dns_name("h.s", "ns") == (("ns", "h", "s"), False)
    assert parse_pod_dns_name("h.s.other", "ns") == (("other", "h", "s"), False)
    assert parse_pod_dns_name("h.s.other.svc", "ns") == (("other", "h", "s"), True)
    assert parse_pod_dns_name("H.S.other.svc.cluster.local", "ns") == (("other", "h", "s"), True)
    assert parse_pod_dns_name("svc.other.svc.cluster.local", "ns") is None  # a Service name, not a pod's
    assert parse_pod_dns_name("a.b.c.d", "ns") is None


def test_substitute_dns() -> None:
    table = {("ns", "master", "grp"): "127.1.0.5", ("ns", "late", "grp"): None}
    text, pending = substitute_dns(
        "tcp://master.grp:29500 master.grp.ns.svc.cluster.local,master.grp.ns MASTER=master.grp.ns.svc", "ns", table)
    assert text == "tcp://127.1.0.5:29500 127.1.0.5,127.1.0.5 MASTER=127.1.0.5"
    assert pending == []
    # look-alikes stay: modules, files, IPs, other namespaces' short names
    for same in ("torch.distributed", "kubetrain_trainer.launch", "model.safetensors", "127.0.0.1",
                 "master.grp.other", "xmaster.grp", "master.grpx", "sub.master.grp"):
        assert substitute_dns(same, "ns", table) == (same, [])
    # a pod without an IP yet, and an explicit cluster name of no pod yet, must wait
    assert substitute_dns("late.grp:1", "ns", table) == ("late.grp:1", ["late.grp"])
    assert substitute_dns("nobody.grp.ns.svc", "ns", table)[1] == ["nobody.grp.ns.svc"]
    assert substitute_dns("nobody.grp", "ns", table)[1] == []


def test_dns_table_from_live_pods() -> None:
    def pod(uid: str, hostname: str, phase: str = "Running", ip: str | None = None, deleting: bool = False) -> dict[str, Any]:
        metadata: dict[str, Any] = {"uid": uid, "namespace": "ns", "name": uid}
        if deleting:
            metadata["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {"metadata": metadata, "spec": {"hostname": hostname, "subdomain": "g"},
                "status": {"phase": phase, **({"podIP": ip} if ip else {})}}

    pods = [pod("a", "a", ip="127.1.0.1"), pod("b", "b"), pod("c", "c"), pod("d", "d", phase="Succeeded", ip="127.1.0.9"),
            pod("e", "e", ip="127.1.0.8", deleting=True), {"metadata": {"uid": "f", "name": "f"}, "spec": {}}]
    table = dns_table(pods, {"c": "127.1.0.3"})
    assert table == {("ns", "a", "g"): "127.1.0.1", ("ns", "b", "g"): None, ("ns", "c", "g"): "127.1.0.3"}


FACTS = PodFacts(pod_ip="127.1.2.3", node_name="local-0", node_cpu=8, node_memory=16 * 1024**3)


def _env_pod(env: list[dict[str, Any]], env_from: list[dict[str, Any]] | None = None,
             resources: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    container = {"name": "c", "env": env, "envFrom": env_from or [], "resources": resources or {}}
    pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "x"},
                        "annotations": {"note": "n"}},
           "spec": {"serviceAccountName": "sa", "containers": [container]}}
    return pod, container


def test_resolve_env_sources_order_and_expansion() -> None:
    sources = {("secret", "s"): {"password": b"hunter2", "user": b"me"}, ("configmap", "c"): {"mode": b"fast"},
               ("secret", "gone"): None}
    env = [
        {"name": "A", "value": "a"},
        {"name": "B", "value": "$(A)-$(user)-$$(A)-$(LATER)"},
        {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "password"}}},
        {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "mode"}}},
        {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "k", "optional": True}}},
        {"name": "OPTKEY", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "nokey", "optional": True}}},
        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "NOTE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['note']"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
        {"name": "HOSTIP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
        {"name": "UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
        {"name": "MCPU", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}},
        {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
        {"name": "LATER", "value": "late"},
    ]
    env_from = [{"secretRef": {"name": "s"}}, {"configMapRef": {"name": "c"}, "prefix": "CM_"},
                {"secretRef": {"name": "gone", "optional": True}}]
    pod, container = _env_pod(env, env_from, {"limits": {"cpu": "1500m"}, "requests": {"cpu": "250m"}})
    got = resolve_env(pod, container, sources, FACTS)
    assert got == {
        "password": "hunter2", "user": "me", "CM_mode": "fast",
        "A": "a", "B": "a-me-$(A)-$(LATER)", "PW": "hunter2", "MODE": "fast",
        "IP": "127.1.2.3", "NAME": "p", "APP": "x", "NOTE": "n", "NODE": "local-0", "SA": "sa",
        "HOSTIP": "127.0.0.1", "UID": "u-1", "CPU": "2", "MCPU": "250", "MEM": str(16 * 1024), "LATER": "late",
    }
    assert list(got)[:3] == ["password", "user", "CM_mode"]  # envFrom first, then env in order


@pytest.mark.parametrize("var, message", [
    ({"secretKeyRef": {"name": "missing", "key": "k"}}, 'secret "missing" not found'),
    ({"configMapKeyRef": {"name": "missing", "key": "k"}}, 'configmap "missing" not found'),
    ({"secretKeyRef": {"name": "s", "key": "nokey"}}, "couldn't find key nokey in Secret ns/s"),
])
def test_resolve_env_missing_required_source_is_a_config_error(var: dict[str, Any], message: str) -> None:
    pod, container = _env_pod([{"name": "X", "valueFrom": var}])
    with pytest.raises(ConfigError) as err:
        resolve_env(pod, container, {("secret", "s"): {"k": b"v"}, ("secret", "missing"): None,
                                     ("configmap", "missing"): None}, FACTS)
    assert err.value.reason == "CreateContainerConfigError"
    assert err.value.message == message


def test_materialize_volumes_and_mounts(tmp_path: Path) -> None:
    pod = {"metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"a": "1"}},
           "spec": {"volumes": [
               {"name": "cfg", "configMap": {"name": "c"}},
               {"name": "some", "configMap": {"name": "c", "items": [{"key": "x", "path": "sub/renamed.txt"}]}},
               {"name": "sec", "secret": {"secretName": "s"}},
               {"name": "optional", "secret": {"secretName": "absent", "optional": True}},
               {"name": "scratch", "emptyDir": {}},
               {"name": "claim", "persistentVolumeClaim": {"claimName": "ckpt"}},
               {"name": "host", "hostPath": {"path": str(tmp_path)}},
               {"name": "info", "downwardAPI": {"items": [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}},
           ]}}
    sources = {("configmap", "c"): {"x": b"X", "y": b"Y"}, ("secret", "s"): {"token": b"t0k"}, ("secret", "absent"): None}
    pod_dir = tmp_path / "pod"
    volumes = materialize_volumes(pod, pod_dir, tmp_path / "pvc", sources, FACTS)
    assert (volumes["cfg"] / "x").read_text() == "X" and (volumes["cfg"] / "y").read_text() == "Y"
    assert (volumes["some"] / "sub/renamed.txt").read_text() == "X" and not (volumes["some"] / "y").exists()
    assert (volumes["sec"] / "token").read_text() == "t0k"
    assert list(volumes["optional"].iterdir()) == []
    assert volumes["scratch"].is_dir() and volumes["claim"] == tmp_path / "pvc" / "ns" / "ckpt"
    assert volumes["host"] == tmp_path and (volumes["info"] / "name").read_text() == "p"
    container = {"volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"},
                                  {"name": "cfg", "mountPath": "/etc/one.txt", "subPath": "x"}]}
    assert mount_paths(container, volumes) == {"/etc/cfg": volumes["cfg"], "/etc/one.txt": volumes["cfg"] / "x"}
    with pytest.raises(ConfigError, match="names no volume"):
        mount_paths({"volumeMounts": [{"name": "nope", "mountPath": "/x"}]}, volumes)
    missing = {"metadata": pod["metadata"], "spec": {"volumes": [{"name": "v", "configMap": {"name": "absent"}}]}}
    with pytest.raises(ConfigError) as err:
        materialize_volumes(missing, pod_dir, tmp_path / "pvc", {("configmap", "absent"): None}, FACTS)
    assert err.value.reason == "ContainerCreating"


def test_build_launch_rewrites_expands_and_waits_for_dns(tmp_path: Path) -> None:
    ctx = LaunchContext(image_roots={"/opt/app": "/src/app"}, extra_env={"EXTRA": "1", "MODE": "host"},
                        python="/my/python", base_env={"PATH": "/bin", "LANG": "C.UTF-8"})
    pod = {"metadata": {"name": "w", "namespace": "ns", "uid": "u"}, "spec": {"hostname": "w0"}}
    container = {"command": ["python", "/opt/app/main.py"],
                 "args": ["--master=$(MASTER):29500", "--out=/data/o", "$$(MASTER)"],
                 "terminationMessagePath": "/tmp/msg", "workingDir": "/opt/app"}
    env = {"MASTER": "m.g", "MODE": "pod", "FILE": "/data/f"}
    launch = build_launch(pod, container, env, {"/data": tmp_path / "d"}, tmp_path, {("ns", "m", "g"): "127.1.0.7"}, ctx)
    assert launch.argv == ["/my/python", "/src/app/main.py", "--master=127.1.0.7:29500", f"--out={tmp_path}/d/o", "$(MASTER)"]
    assert launch.env["MASTER"] == "127.1.0.7" and launch.env["FILE"] == f"{tmp_path}/d/f"
    assert launch.env["MODE"] == "pod" and launch.env["EXTRA"] == "1"  # the container wins over extra_env
    assert launch.env["HOME"] == str(tmp_path / "home") and launch.env["TMPDIR"] == str(tmp_path / "tmp")
    assert launch.env["HOSTNAME"] == "w0" and launch.env["PATH"] == "/bin"
    assert launch.cwd == Path("/src/app")
    assert launch.termination_file == tmp_path / "termination-log"
    with pytest.raises(DnsPending) as err:
        build_launch(pod, container, env, {}, tmp_path, {("ns", "m", "g"): None}, ctx)
    assert err.value.names == ["m.g"]
    unmapped = build_launch(pod, {"command": ["true"], "workingDir": "/no/such/dir"}, {}, {}, tmp_path, {}, ctx)
    assert unmapped.cwd == tmp_path / "rootfs/no/such/dir"


def test_termination_message(tmp_path: Path) -> None:
    term, logf = tmp_path / "term", tmp_path / "log"
    term.write_text("")
    logf.write_text("".join(f"line {i}\n" for i in range(200)))
    assert termination_message(term, logf, "File", failed=True) == ""
    fallback = termination_message(term, logf, "FallbackToLogsOnError", failed=True)
    assert fallback.endswith("line 199") and "line 119" not in fallback and len(fallback) <= 2048
    assert termination_message(term, logf, "FallbackToLogsOnError", failed=False) == ""
    term.write_text("x" * 5000)
    assert termination_message(term, logf, "FallbackToLogsOnError", failed=True) == "x" * 4096


def test_merge_conditions_keeps_others_and_transition_times() -> None:
    existing = [{"type": "Ready", "status": "True", "lastTransitionTime": "t0"},
                {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}]
    merged = {c["type"]: c for c in merge_conditions(existing, [{"type": "Ready", "status": "True"},
                                                                {"type": "Initialized", "status": "True"}], "t1")}
    assert merged["Ready"]["lastTransitionTime"] == "t0" and merged["Initialized"]["lastTransitionTime"] == "t1"
    assert merged["DisruptionTarget"]["reason"] == "EvictionByEvictionAPI"
    flipped = merge_conditions(existing, [{"type": "Ready", "status": "False"}], "t2")
    assert flipped[0]["lastTransitionTime"] == "t2"


def test_exit_code_and_signal() -> None:
    assert exit_code_and_signal(0) == (0, None)
    assert exit_code_and_signal(3) == (3, None)
    assert exit_code_and_signal(-9) == (137, 9)
    assert exit_code_and_signal(-15) == (143, 15)


def test_ip_allocator_unique_loopback_never_host() -> None:
    ips = IpAllocator()
    got = [ips.allocate() for _ in range(600)]
    assert len(set(got)) == 600
    assert all(ip.startswith("127.") and not ip.startswith("127.0.0.") for ip in got)
    assert not any(ip.endswith((".0", ".255")) for ip in got)
    ips.release(got[0])
    assert ips.allocate() not in got[1:]


# ==================================================================================================
# end to end: API server + executor subprocesses, kubernetes client

NODES = 3
STARTUP_TIMEOUT = 30.0


def _start(cmd: list[str], out: Path, ready_text: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a server process logging to a file; return once the file shows `ready_text`."""
    handle = open(out, "wb")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=REPO)
    handle.close()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while ready_text not in out.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{cmd[2]} did not start:\n{out.read_text(errors='replace')[-4000:]}")
        time.sleep(0.05)
    return proc


def _stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Cluster:
    """Handles for the tests: the kubernetes client, directories, and the executor command line."""

    def __init__(self, root: Path, url: str, kubeconfig: Path):
        from kubernetes import client, config

        self.root = root
        self.url = url
        self.kubeconfig = kubeconfig
        self.state_dir = root / "state"
        self.log_dir = root / "logs"
        self.app_dir = root / "app"
        self.api_client = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(self.api_client)

    def executor_cmd(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "kubetrain_devcluster.executor", "--kubeconfig", str(self.kubeconfig),
                "--state-dir", str(self.state_dir), "--log-dir", str(self.log_dir), "--shutdown-grace", "2", *extra]

    # ---- reading

    def pod(self, name: str) -> dict[str, Any] | None:
        """The raw pod (None when gone)."""
        from kubernetes.client.exceptions import ApiException

        try:
            resp = self.core.read_namespaced_pod(name, "default", _preload_content=False)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return json.loads(resp.data)

    def wait_pod(self, name: str, check: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        last = wait_for(lambda: (p := self.pod(name)) is not None and check(p) and p, timeout, lambda: self.pod(name))
        return last

    def wait_gone(self, name: str, timeout: float = 20.0) -> None:
        wait_for(lambda: self.pod(name) is None, timeout, lambda: self.pod(name))

    def pod_dir(self, pod: dict[str, Any]) -> Path:
        return self.state_dir / "pods" / "default" / f"{pod['metadata']['name']}-{pod['metadata']['uid'][:8]}"

    def log_file(self, pod: dict[str, Any]) -> Path:
        return self.log_dir / "default" / f"{pod['metadata']['name']}_{pod['metadata']['uid']}.log"

    # ---- writing

    def create(self, name: str, code: str, **extra: Any) -> dict[str, Any]:
        """A pod running `python -c code`; `extra` goes into the container, `pod_spec` into the pod spec."""
        pod_spec = extra.pop("pod_spec", {})
        container = {"name": "main", "image": "kubetrain/local:dev", "command": ["python", "-c", textwrap.dedent(code)],
                     **extra}
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"test": "executor"}},
                "spec": {"restartPolicy": "Never", "containers": [container], **pod_spec}}
        return self.api_client.sanitize_for_serialization(self.core.create_namespaced_pod("default", body))

    def watch_pod(self, name: str) -> PodEvents:
        return PodEvents(self, name)


class PodEvents:
    """Collects a pod's watch events in a thread, so short-lived states (right before removal) are seen."""

    def __init__(self, cluster: Cluster, name: str):
        from kubernetes import watch

        self.events: list[tuple[str, dict[str, Any]]] = []
        self._watch = watch.Watch()
        self._cluster = cluster
        self._name = name
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._started.wait(5)

    def _run(self) -> None:
        self._started.set()
        stream = self._watch.stream(self._cluster.core.list_namespaced_pod, "default",
                                    field_selector=f"metadata.name={self._name}", timeout_seconds=60,
                                    _preload_content=False)
        for event in stream:
            self.events.append((event["type"], event["raw_object"]))
            if event["type"] == "DELETED":
                break

    def wait_deleted(self, timeout: float = 20.0) -> list[tuple[str, dict[str, Any]]]:
        self._thread.join(timeout)
        self._watch.stop()
        assert self.events and self.events[-1][0] == "DELETED", [e[0] for e in self.events]
        return self.events

    def statuses(self) -> list[dict[str, Any]]:
        return [obj.get("status") or {} for _, obj in self.events]


def wait_for(predicate: Callable[[], Any], timeout: float, describe: Callable[[], Any] = lambda: None) -> Any:
    """Poll every 0.1 s until predicate() is truthy; fail with describe() after timeout."""
    return polling.wait_for("the condition", predicate, timeout,
                            lambda: f"last state: {json.dumps(describe(), indent=1)[:3000]}", interval=0.1)


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or [{}]
    return (statuses[0].get("state") or {}).get("terminated") or {}


def condition_of(pod_status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in pod_status.get("conditions") or [] if c.get("type") == kind), {})


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The dev API server and an executor with 3 nodes (label pool=cpu), as subprocesses."""
    root = tmp_path_factory.mktemp("devcluster")
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    kubeconfig = root / "kubeconfig"  # the server writes it, with a fresh random token
    api = _start([sys.executable, "-m", "kubetrain_devcluster.apiserver", "--port", str(port), "--log-dir", str(root / "logs"),
                  "--kubeconfig", str(kubeconfig)], root / "apiserver.out", f"listening on {url}")
    c = Cluster(root, url, kubeconfig)
    c.app_dir.mkdir()
    executor = None
    try:
        executor = _start(c.executor_cmd("--nodes", str(NODES), "--node-label", "pool=cpu",
                                         "--image-root", f"/opt/app={c.app_dir}", "--env", "KT_EXTRA=from-executor"),
                          root / "executor.out", f"kubetrain executor ready ({NODES} nodes)")
        yield c
    finally:
        try:
            if executor is not None:
                assert _stop(executor) == 0, (root / "executor.out").read_text()[-4000:]
        finally:
            _stop(api)


# ---- running to completion


def test_nodes_are_registered(cluster: Cluster) -> None:
    nodes = {n.metadata.name: n for n in cluster.core.list_node().items}
    for i in range(NODES):
        node = nodes[f"local-{i}"]
        assert node.metadata.labels["kubernetes.io/hostname"] == f"local-{i}"
        assert node.metadata.labels["kubernetes.io/os"] == "linux" and node.metadata.labels["pool"] == "cpu"
        assert [(c.type, c.status) for c in node.status.conditions] == [("Ready", "True")]
        assert int(node.status.capacity["cpu"]) >= 1


def test_exit_zero_succeeds(cluster: Cluster) -> None:
    cluster.create("ok", "print('hello from the pod')")
    pod = cluster.wait_pod("ok", lambda p: p["status"].get("phase") == "Succeeded")
    state = terminated(pod)
    assert state["exitCode"] == 0 and state["reason"] == "Completed" and "signal" not in state
    assert state["startedAt"] and state["finishedAt"]
    st = pod["status"]
    assert st["podIP"].startswith("127.") and not st["podIP"].startswith("127.0.0.") and st["hostIP"] == "127.0.0.1"
    assert pod["spec"]["nodeName"].startswith("local-")
    assert st["containerStatuses"][0]["containerID"].startswith("local://")
    assert st["containerStatuses"][0]["restartCount"] == 0 and st["containerStatuses"][0]["ready"] is False
    assert condition_of(st, "PodScheduled")["status"] == "True" and condition_of(st, "Ready")["status"] == "False"
    assert "hello from the pod" in cluster.log_file(pod).read_text()
    assert "hello from the pod" in cluster.core.read_namespaced_pod_log("ok", "default")  # the same file, served


def test_exit_three_fails_with_termination_message(cluster: Cluster) -> None:
    cluster.create("three", """
        import sys
        open('/dev/termination-log', 'w').write('bad input: 42')
        sys.exit(3)
    """)
    pod = cluster.wait_pod("three", lambda p: p["status"].get("phase") == "Failed")
    state = terminated(pod)
    assert (state["exitCode"], state["reason"], state["message"]) == (3, "Error", "bad input: 42")


def test_fallback_to_logs_on_error(cluster: Cluster) -> None:
    cluster.create("fallback", """
        import sys
        for i in range(100):
            print('line', i)
        sys.exit(1)
    """, terminationMessagePolicy="FallbackToLogsOnError")
    state = terminated(cluster.wait_pod("fallback", lambda p: p["status"].get("phase") == "Failed"))
    assert state["exitCode"] == 1 and state["message"].endswith("line 99") and "line 19\n" not in state["message"]


def test_pods_spread_round_robin_and_get_unique_ips(cluster: Cluster) -> None:
    names = [f"spread-{i}" for i in range(NODES)]
    for name in names:
        cluster.create(name, "pass")
    pods = [cluster.wait_pod(n, lambda p: p["status"].get("phase") == "Succeeded") for n in names]
    assert {p["spec"]["nodeName"] for p in pods} == {f"local-{i}" for i in range(NODES)}
    assert len({p["status"]["podIP"] for p in pods}) == NODES


def test_transient_api_errors_are_retried(cluster: Cluster) -> None:
    """The server fails the bind once and the status writes three times: the pod still runs to the end."""
    arm_fault(cluster, {"status": 503, "count": 1, "methods": ["PATCH"], "pathRegex": "/pods/flaky$"})
    arm_fault(cluster, {"status": 500, "count": 3, "methods": ["PATCH"], "pathRegex": "/pods/flaky/status$"})
    try:
        cluster.create("flaky", "open('/dev/termination-log', 'w').write('made it')")
        pod = cluster.wait_pod("flaky", lambda p: p["status"].get("phase") == "Succeeded")
        assert terminated(pod)["message"] == "made it"
        assert condition_of(pod["status"], "PodScheduled")["status"] == "True"
    finally:
        clear_faults(cluster)


def arm_fault(cluster: Cluster, fault: dict[str, Any]) -> None:
    headers, tls = credentials(cluster.kubeconfig)
    request = urllib.request.Request(f"{cluster.url}/_kubetrain/faults", data=json.dumps(fault).encode(),
                                     headers={"Content-Type": "application/json", **headers}, method="POST")
    urllib.request.urlopen(request, timeout=5, context=tls).close()


def clear_faults(cluster: Cluster) -> None:
    headers, tls = credentials(cluster.kubeconfig)
    request = urllib.request.Request(f"{cluster.url}/_kubetrain/faults", method="DELETE", headers=headers)
    urllib.request.urlopen(request, timeout=5, context=tls).close()


def test_pod_executor_in_process_run_and_stop(cluster: Cluster) -> None:
    """The Python API: PodExecutor(url, options).run() until stop(), on its own node."""

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        options = ExecutorOptions(state_dir=cluster.state_dir, log_dir=cluster.log_dir, nodes=1, node_prefix="inproc",
                                  node_labels={"where": "inproc"}, shutdown_grace=1)
        executor = PodExecutor(ApiClient.from_kubeconfig(cluster.kubeconfig), options)
        running = asyncio.create_task(executor.run())
        await asyncio.wait_for(executor.ready.wait(), 10)
        body = {"metadata": {"name": "inproc-pod"},
                "spec": {"restartPolicy": "Never", "nodeSelector": {"where": "inproc"},
                         "containers": [{"name": "c", "image": "x", "command": ["python", "-c", "print(1)"]}]}}
        await executor.api.request("POST", "/api/v1/namespaces/default/pods", body)
        deadline = time.monotonic() + 20
        while (pod := await executor.api.get("/api/v1/namespaces/default/pods/inproc-pod"))["status"].get("phase") != "Succeeded":
            assert time.monotonic() < deadline, pod
            await asyncio.sleep(0.1)
        await executor.stop()
        assert running.done()
        node = cluster.api_client.sanitize_for_serialization(cluster.core.read_node("inproc-0"))
        return pod, node

    pod, node = asyncio.run(scenario())
    assert pod["spec"]["nodeName"] == "inproc-0" and terminated(pod)["exitCode"] == 0
    assert [(c["type"], c["status"]) for c in node["status"]["conditions"]] == [("Ready", "False")]


# ---- env, files, DNS


def test_env_from_every_source_reaches_the_process(cluster: Cluster) -> None:
    cluster.core.create_namespaced_secret("default", {
        "metadata": {"name": "creds"}, "data": {"password": base64.b64encode(b"hunter2").decode(),
                                                "user": base64.b64encode(b"alice").decode()}})
    cluster.core.create_namespaced_config_map("default", {"metadata": {"name": "settings"}, "data": {"mode": "fast"}})
    cluster.create("env", """
        import json, os, sys
        keys = ['PW', 'MODE', 'IP', 'NAME', 'GREETING', 'ESCAPED', 'CM_mode', 'user', 'KT_EXTRA', 'OPTIONAL']
        seen = {k: os.environ.get(k) for k in keys}
        seen.update(argv=sys.argv[1:], home=os.environ['HOME'], tmp=os.environ['TMPDIR'], cwd=os.getcwd())
        json.dump(seen, open('/data/env.json', 'w'))
    """, args=["$(NAME)@$(IP)", "$$(NAME)", "$(NOPE)"],
        env=[{"name": "PW", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
             {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
             {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
             {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
             {"name": "GREETING", "value": "hi $(NAME) on $(IP) as $(user)"},
             {"name": "ESCAPED", "value": "$$(NAME)"},
             {"name": "OPTIONAL", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": True}}}],
        envFrom=[{"configMapRef": {"name": "settings"}, "prefix": "CM_"}, {"secretRef": {"name": "creds"}}],
        volumeMounts=[{"name": "data", "mountPath": "/data"}],
        pod_spec={"volumes": [{"name": "data", "emptyDir": {}}]})
    pod = cluster.wait_pod("env", lambda p: p["status"].get("phase") in ("Succeeded", "Failed"))
    assert pod["status"]["phase"] == "Succeeded", cluster.log_file(pod).read_text()
    ip, pod_dir = pod["status"]["podIP"], cluster.pod_dir(pod)
    seen = json.loads((pod_dir / "volumes" / "data" / "env.json").read_text())
    assert seen == {
        "PW": "hunter2", "MODE": "fast", "IP": ip, "NAME": "env", "GREETING": f"hi env on {ip} as alice",
        "ESCAPED": "$(NAME)", "CM_mode": "fast", "user": "alice", "KT_EXTRA": "from-executor", "OPTIONAL": None,
        "argv": [f"env@{ip}", "$(NAME)", "$(NOPE)"],
        "home": str(pod_dir / "home"), "tmp": str(pod_dir / "tmp"), "cwd": str(pod_dir),
    }


def test_config_map_volume_and_image_root_paths_are_rewritten(cluster: Cluster) -> None:
    cluster.core.create_namespaced_config_map("default", {"metadata": {"name": "files"},
                                                          "data": {"job.yaml": "lr: 0.1\n", "other": "x"}})
    (cluster.app_dir / "show.py").write_text(
        "import sys\nopen(sys.argv[3], 'w').write(open(sys.argv[1]).read() + open(sys.argv[2]).read())\n")
    # only command, args, env and workingDir are rewritten: paths inside the script's code are not
    cluster.create("files", "", command=["python", "/opt/app/show.py", "/etc/kt/job.yaml"],
                   args=["/etc/one", "/dev/termination-log"],
                   volumeMounts=[{"name": "cfg", "mountPath": "/etc/kt"},
                                 {"name": "cfg", "mountPath": "/etc/one", "subPath": "other"}],
                   pod_spec={"volumes": [{"name": "cfg", "configMap": {"name": "files"}}]})
    pod = cluster.wait_pod("files", lambda p: p["status"].get("phase") in ("Succeeded", "Failed"))
    assert terminated(pod)["message"] == "lr: 0.1\nx", cluster.log_file(pod).read_text()


def test_dns_names_of_other_pods_become_their_ips(cluster: Cluster) -> None:
    """The client starts first and waits until the server pod has an IP; then it really connects to it."""
    cluster.create("client", """
        import os, socket, sys, time
        host, port = sys.argv[1].rsplit(':', 1)
        deadline = time.time() + 15
        while True:
            try:
                conn = socket.create_connection((host, int(port)), timeout=1)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        got = conn.recv(100).decode()
        open('/dev/termination-log', 'w').write(' '.join([sys.argv[1], os.environ['PEER'], os.environ['SHORT'], got]))
    """, args=["srv.grp.default.svc.cluster.local:7777"],
        env=[{"name": "PEER", "value": "srv.grp.default.svc"}, {"name": "SHORT", "value": "tcp://srv.grp:7777"}])
    time.sleep(0.3)
    client = cluster.pod("client")
    assert client is not None and client["status"].get("phase") == "Pending"
    cluster.create("srv", """
        import os, socket
        server = socket.create_server((os.environ['IP'], 7777))
        conn, _ = server.accept()
        conn.sendall(b'hello-from-srv')
        conn.close()
    """, env=[{"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        pod_spec={"hostname": "srv", "subdomain": "grp"})
    done = cluster.wait_pod("client", lambda p: p["status"].get("phase") in ("Succeeded", "Failed"))
    srv = cluster.wait_pod("srv", lambda p: p["status"].get("phase") == "Succeeded")
    ip = srv["status"]["podIP"]
    assert terminated(done)["message"] == f"{ip}:7777 {ip} tcp://{ip}:7777 hello-from-srv", cluster.log_file(done).read_text()


# ---- scheduling and config errors


def test_node_selector_picks_the_node_or_leaves_the_pod_unschedulable(cluster: Cluster) -> None:
    cluster.create("pinned", "pass", pod_spec={"nodeSelector": {"pool": "cpu", "kubernetes.io/hostname": "local-1"}})
    cluster.create("nowhere", "pass", pod_spec={"nodeSelector": {"pool": "gpu"}})
    assert cluster.wait_pod("pinned", lambda p: p["status"].get("phase") == "Succeeded")["spec"]["nodeName"] == "local-1"
    pod = cluster.wait_pod("nowhere", lambda p: condition_of(p["status"], "PodScheduled").get("reason") == "Unschedulable")
    cond = condition_of(pod["status"], "PodScheduled")
    assert cond["status"] == "False" and "didn't match Pod's node affinity/selector" in cond["message"]
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")
    time.sleep(0.5)
    assert not cluster.pod("nowhere")["spec"].get("nodeName")
    cluster.core.delete_namespaced_pod("nowhere", "default")
    cluster.wait_gone("nowhere")


def test_missing_secret_waits_with_create_container_config_error(cluster: Cluster) -> None:
    cluster.create("needs-secret", "import os; open('/dev/termination-log', 'w').write(os.environ['TOKEN'])",
                   env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "late-secret", "key": "token"}}}])
    pod = cluster.wait_pod("needs-secret", lambda p: any(
        (s.get("state") or {}).get("waiting", {}).get("reason") == "CreateContainerConfigError"
        for s in p["status"].get("containerStatuses") or []))
    waiting = pod["status"]["containerStatuses"][0]["state"]["waiting"]
    assert waiting["message"] == 'secret "late-secret" not found' and pod["status"]["phase"] == "Pending"
    cluster.core.create_namespaced_secret("default", {"metadata": {"name": "late-secret"},
                                                      "stringData": {"token": "t0ken"}})
    pod = cluster.wait_pod("needs-secret", lambda p: p["status"].get("phase") == "Succeeded")
    assert terminated(pod)["message"] == "t0ken"


# ---- stopping pods

TRAP_TERM = """
    import os, signal, sys, time
    def on_term(*_):
        open('/dev/termination-log', 'w').write('preempted')
        sys.exit(75)
    signal.signal(signal.SIGTERM, on_term)
    open(os.environ['HOME'] + '/pid', 'w').write(str(os.getpid()))
    time.sleep(60)
"""

IGNORE_TERM = """
    import os, signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(os.environ['HOME'] + '/pid', 'w').write(str(os.getpid()))
    time.sleep(60)
"""


def start_long(cluster: Cluster, name: str, code: str, **extra: Any) -> tuple[dict[str, Any], int]:
    """A long-running pod, once it runs and its signal handlers are installed; and its pid."""
    cluster.create(name, code, **extra)
    pod = cluster.wait_pod(name, lambda p: p["status"].get("phase") == "Running")
    pid_file = cluster.pod_dir(pod) / "home" / "pid"
    wait_for(lambda: pid_file.exists() and pid_file.read_text(), 10)
    return pod, int(pid_file.read_text())


def test_graceful_delete_records_the_sigterm_exit_code_then_removes(cluster: Cluster) -> None:
    _, pid = start_long(cluster, "graceful", TRAP_TERM)
    events = cluster.watch_pod("graceful")
    cluster.core.delete_namespaced_pod("graceful", "default", grace_period_seconds=10)
    history = events.wait_deleted()
    finals = [terminated(obj) for kind, obj in history if terminated(obj)]
    assert finals and finals[-1]["exitCode"] == 75 and finals[-1]["message"] == "preempted"
    assert "signal" not in finals[-1]
    assert not process_alive(pid)


def test_sigterm_ignored_is_killed_after_the_grace_period(cluster: Cluster) -> None:
    _, pid = start_long(cluster, "stubborn", IGNORE_TERM)
    events = cluster.watch_pod("stubborn")
    started = time.monotonic()
    cluster.core.delete_namespaced_pod("stubborn", "default", grace_period_seconds=1)
    history = events.wait_deleted()
    elapsed = time.monotonic() - started
    final = [terminated(obj) for _, obj in history if terminated(obj)][-1]
    assert (final["exitCode"], final["signal"], final["reason"]) == (137, 9, "Error")
    assert 0.9 <= elapsed < 8, elapsed
    assert not process_alive(pid)


def test_force_delete_kills_at_once(cluster: Cluster) -> None:
    _, pid = start_long(cluster, "forced", IGNORE_TERM)
    cluster.core.delete_namespaced_pod("forced", "default", grace_period_seconds=0)
    cluster.wait_gone("forced", timeout=5)
    wait_for(lambda: not process_alive(pid), 5)


def test_eviction_sets_disruption_target_then_removes(cluster: Cluster) -> None:
    _, pid = start_long(cluster, "evicted", TRAP_TERM)
    events = cluster.watch_pod("evicted")
    cluster.core.create_namespaced_pod_eviction("evicted", "default", {
        "apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "evicted", "namespace": "default"}})
    history = events.wait_deleted()
    statuses = [obj.get("status") or {} for _, obj in history]
    assert any(condition_of(s, "DisruptionTarget").get("status") == "True" for s in statuses)
    final_kind, final_obj = [(k, o) for k, o in history if terminated(o)][-1]
    assert terminated(final_obj)["exitCode"] == 75
    assert condition_of(final_obj["status"], "DisruptionTarget").get("status") == "True"  # kept by our status writes
    assert not process_alive(pid)


def test_executor_shutdown_stops_its_pods_and_restart_cleans_up(cluster: Cluster) -> None:
    """A second executor (own node) stopped with SIGTERM ends its pod; a crashed one's pods are NodeRestarted."""
    cmd = cluster.executor_cmd("--nodes", "1", "--node-prefix", "extra")
    out = cluster.root / "extra-executor.out"
    pin = {"nodeSelector": {"kubernetes.io/hostname": "extra-0"}}
    extra = _start(cmd, out, "kubetrain executor ready (1 nodes)")
    try:
        _, pid = start_long(cluster, "on-extra", TRAP_TERM, pod_spec=pin)
        assert _stop(extra) == 0
        assert not process_alive(pid)
        pod = cluster.wait_pod("on-extra", lambda p: p["status"].get("phase") == "Failed")
        assert pod["status"]["reason"] == "Terminated" and terminated(pod)["exitCode"] == 75
        assert condition_of(pod["status"], "DisruptionTarget")["reason"] == "TerminationByKubelet"
        node = cluster.core.read_node("extra-0")
        assert [(c.type, c.status) for c in node.status.conditions] == [("Ready", "False")]

        extra = _start(cmd, out, "kubetrain executor ready (1 nodes)")
        _, pid = start_long(cluster, "orphan", IGNORE_TERM, pod_spec=pin)
        extra.kill()  # a crash: the pod's process outlives it
        extra.wait()
        os.killpg(pid, signal.SIGKILL)
        events = cluster.watch_pod("orphan")
        extra = _start(cmd, out, "kubetrain executor ready (1 nodes)")
        history = events.wait_deleted()
        assert any(s.get("reason") == "NodeRestarted" and s.get("phase") == "Failed" for s in events.statuses()), history
        assert cluster.pod("on-extra")["status"]["phase"] == "Failed"  # finished pods are left alone
    finally:
        _stop(extra)


def test_deleting_a_node_kills_its_pods(cluster: Cluster) -> None:
    """Runs last: local-2 is gone afterwards."""
    _, pid = start_long(cluster, "on-lost-node", IGNORE_TERM,
                        pod_spec={"nodeSelector": {"kubernetes.io/hostname": "local-2"}})
    events = cluster.watch_pod("on-lost-node")
    cluster.core.delete_node("local-2")
    history = events.wait_deleted()
    lost = [s for s in events.statuses() if s.get("reason") == "NodeLost"]
    assert lost and lost[-1]["phase"] == "Failed", history
    assert condition_of(lost[-1], "DisruptionTarget")["reason"] == "DeletionByTaintManager"
    assert condition_of(lost[-1], "Ready")["status"] == "False"
    assert not process_alive(pid)
    time.sleep(0.5)
    assert "local-2" not in {n.metadata.name for n in cluster.core.list_node().items}  # not re-registered
