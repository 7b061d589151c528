"""`kubetrain dev-cluster`: a whole kubetrain installation on one machine, no Kubernetes needed.

Four real processes talking HTTP, as in a cluster:
- the API server (kmock-based, `apiserver.py`) with the TrainingJob CRD registered;
- the pod executor (`executor.py`): the kubelet and scheduler stand-in, running pods as processes;
- the kubetrain operator (`python -m kubetrain_operator`, kopf), exactly as in the chart;
- a moto S3 server, with a bucket, and a Secret `s3-creds` the operator hands to jobs whose
  checkpoint URI is a local path (so `examples/trainingjob.yaml` checkpoints to S3 unchanged).
  Pods reach it through a fault proxy (`s3faults.py`, in this process) that can refuse or slow
  requests on demand; `cluster.s3_endpoint` is the proxy, `cluster.s3` the server itself.
The "trainer image" is this Python environment; the image's /opt/kubetrain is this checkout.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from kubetrain.ports import free_port

from .s3 import ACCESS_KEY, SECRET_KEY, S3Server
from .s3faults import CONTROL_PATH, S3FaultProxy

IMAGE_ROOT = "/opt/kubetrain"
BUCKET = "kubetrain"
S3_SECRET = "s3-creds"
CHECKPOINT_URI = f"s3://{BUCKET}/checkpoints"


def default_image_root(image_root: Path | None = None) -> Path:
    """What pods see as the trainer image's /opt/kubetrain: a directory holding `examples/` (the given
    one, else the current directory, e.g. a checkout)."""
    root = Path(image_root or Path.cwd()).resolve()
    if not (root / "examples").is_dir():
        raise SystemExit(f"dev cluster: {root} has no examples/ directory; pass --image-root (the trainer image's "
                         f"{IMAGE_ROOT}: a kubetrain checkout)")
    return root


class ManagedProcess:
    """A child that says when it is ready by printing a line; its output goes to a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, ready_line: str, env: dict[str, str] | None = None):
        self.name, self.argv, self.log_path, self.ready_line = name, argv, log_path, ready_line
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_line in self._output(offset):
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self._output(offset)[-4000:]}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready within {timeout}s:\n{self._output(offset)[-4000:]}")

    def _output(self, offset: int = 0) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def output(self) -> str:
        return self._output() if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, no cleanup: a crashed process."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class DevCluster:
    """Start with `with DevCluster(state_dir) as cluster:`; `cluster.kubeconfig` is what kubectl needs."""

    def __init__(self, state_dir: Path, *, nodes: int = 2, image_root: Path | None = None,
                 pod_env: dict[str, str] | None = None, namespace: str = "default", executor: bool = True):
        """`executor=False`: no pod ever runs (pods stay as the operator made them, or as the caller patches them)."""
        self.run_executor = executor
        self.state_dir = Path(state_dir).resolve()
        self.nodes, self.image_root, self.namespace = nodes, default_image_root(image_root), namespace
        self.pod_env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                        "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, nodes))), **(pod_env or {})}
        self.kubeconfig = self.state_dir / "kubeconfig"
        self.logs = self.state_dir / "logs"
        self.audit_log = self.logs / "audit.jsonl"
        self.s3 = S3Server()
        self.s3_proxy: S3FaultProxy | None = None
        self.api_url = ""
        self.tokens: dict[str, str] = {}  # user -> bearer token
        self.operator_metrics_port = 0
        self.api: ManagedProcess | None = None
        self.executor: ManagedProcess | None = None
        self.operator: ManagedProcess | None = None

    # --- lifecycle
    def start(self) -> DevCluster:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_s3()
            self._start_api()
            self._create_s3_secret()
            if self.run_executor:
                self._start_executor()
            self.start_operator()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proc in (self.operator, self.executor, self.api):
            if proc is not None:
                proc.stop()
        if self.s3_proxy is not None:
            self.s3_proxy.stop()
        self.s3.stop()

    @property
    def s3_endpoint(self) -> str:
        """What pods use: the fault proxy in front of moto."""
        assert self.s3_proxy is not None, "not started"
        return self.s3_proxy.endpoint

    def __enter__(self) -> DevCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- parts
    def _start_s3(self) -> None:
        self.s3.start()
        self.s3.create_bucket(BUCKET)
        self.s3_proxy = S3FaultProxy(self.s3.endpoint).start()

    def _start_api(self) -> None:
        from kubetrain.crd import crd_yaml

        from .access import new_token, self_signed_tls, write_tokens
        from .apiserver import write_kubeconfig

        crd = self.state_dir / "trainingjob-crd.yaml"
        crd.write_text(crd_yaml())
        # random tokens, one per component: the server accepts only these, and the audit log names the caller
        self.tokens = {user: new_token(user) for user in ("admin", "operator", "executor")}
        tokens_file = write_tokens(self.state_dir / "tokens.json", {t: u for u, t in self.tokens.items()})
        self.tls_cert, key = self_signed_tls(self.state_dir / "tls")
        port = free_port()
        self.api = ManagedProcess(
            "apiserver",
            [sys.executable, "-m", "kubetrain_devcluster.apiserver", "--port", str(port), "--tokens-file", str(tokens_file),
             "--tls-cert", str(self.tls_cert), "--tls-key", str(key),
             "--log-dir", str(self.logs / "pods"), "--crd", str(crd), "--audit-log", str(self.audit_log)],
            self.logs / "apiserver.log", "kubetrain apiserver listening on").start()
        self.api_url = f"https://127.0.0.1:{port}"
        write_kubeconfig(self.kubeconfig, self.api_url, namespace=self.namespace, token=self.tokens["admin"], ca=self.tls_cert)
        for component in ("operator", "executor"):
            write_kubeconfig(self.component_kubeconfig(component), self.api_url, self.namespace, token=self.tokens[component],
                             ca=self.tls_cert)

    def _create_s3_secret(self) -> None:
        core = self.core_api()
        core.create_namespaced_secret(self.namespace, {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": S3_SECRET, "namespace": self.namespace},
            "stringData": {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY},
            "type": "Opaque"})

    def _start_executor(self) -> None:
        argv = [sys.executable, "-m", "kubetrain_devcluster.executor", "--kubeconfig", str(self.component_kubeconfig("executor")),
                "--state-dir", str(self.state_dir / "executor"), "--nodes", str(self.nodes),
                "--image-root", f"{IMAGE_ROOT}={self.image_root}", "--log-dir", str(self.logs / "pods")]
        for key, value in self.pod_env.items():
            argv += ["--env", f"{key}={value}"]
        self.executor = ManagedProcess("executor", argv, self.logs / "executor.log", "kubetrain executor ready").start()

    def start_operator(self, *, leader_elect: bool = False, name: str = "operator") -> ManagedProcess:
        """(Re)start the operator; it picks up every existing job (kopf resume handlers).

        `name` "operator" is the cluster's operator (`self.operator`, metrics at `operator_metrics_port`); other
        names start more replicas beside it, for leader election (`leader_elect`: each campaigns for the Lease
        kubetrain-operator in the cluster's namespace, and is ready once it campaigns, leader or not)."""
        metrics_port = free_port()
        argv = [sys.executable, "-m", "kubetrain_operator", "--metrics-port", str(metrics_port),
                "--metrics-addr", "127.0.0.1", "--liveness-port", "0",
                "--default-checkpoint-uri", CHECKPOINT_URI, "--default-s3-secret", S3_SECRET,
                "--default-s3-endpoint", self.s3_endpoint,
                # Pods share this machine's network, so each job gets its own port; the range lies below
                # Linux's ephemeral ports (32768-60999), which any outgoing connection may already hold.
                "--rendezvous-port-range", "20000-29999"]
        if leader_elect:
            argv += ["--leader-elect", "--leader-election-namespace", self.namespace]
        proc = ManagedProcess(name, argv, self.logs / f"{name}.log",
                              "campaigns for lease" if leader_elect else "kubetrain operator started",
                              env={"KUBECONFIG": str(self.component_kubeconfig("operator"))}).start()
        if name == "operator":
            self.operator, self.operator_metrics_port = proc, metrics_port
        return proc

    def component_kubeconfig(self, component: str) -> Path:
        return self.state_dir / f"{component}.kubeconfig"

    def api_faults(self, method: str = "GET", fault: dict | None = None) -> dict:
        """The API server's fault injection (apiserver.py, item 13): POST arms `fault`, GET lists the armed
        and spent faults with their hits, DELETE clears them."""
        import json
        import urllib.request

        from .apiserver import FAULTS_PATH

        request = urllib.request.Request(f"{self.api_url}{FAULTS_PATH}", method=method,
                                         data=None if fault is None else json.dumps(fault).encode(),
                                         headers={"Content-Type": "application/json", **self.auth_headers()})
        with urllib.request.urlopen(request, timeout=10, context=self.tls()) as response:
            return json.load(response)

    def tls(self):
        """The SSL context a raw client (urllib) verifies the API server with."""
        from .access import client_tls

        return client_tls(self.tls_cert)

    def auth_headers(self) -> dict[str, str]:
        """For a raw HTTP request to the API server as the admin (what the printed kubeconfig holds)."""
        return {"Authorization": f"Bearer {self.tokens['admin']}"}

    def requests_by(self, user: str) -> list[dict]:
        """The audit log's entries for one component ("operator", "executor", or a user's token)."""
        import json

        lines = self.audit_log.read_text().splitlines() if self.audit_log.exists() else []
        return [e for e in map(json.loads, lines) if e["user"] == user]

    # --- clients
    def api_client(self):
        import kubernetes

        return kubernetes.config.new_client_from_config(str(self.kubeconfig))

    def core_api(self):
        import kubernetes

        return kubernetes.client.CoreV1Api(self.api_client())

    def custom_api(self):
        import kubernetes

        return kubernetes.client.CustomObjectsApi(self.api_client())


def run_dev_cluster(state_dir: Path, nodes: int, image_root: Path | None = None) -> int:
    """Foreground: start everything, print how to use it, stop on Ctrl-C / SIGTERM."""
    stop = False

    def request_stop(*_):
        nonlocal stop
        stop = True

    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or "kubectl"
    with DevCluster(state_dir, nodes=nodes, image_root=image_root) as cluster:
        print(f"""kubetrain dev cluster is up ({nodes} nodes). In another shell:

  export KUBECONFIG={cluster.kubeconfig}
  {kubectl} apply -f examples/trainingjob.yaml
  {kubectl} get tj,pods -w
  {kubectl} delete pod sentiment-minilm-1     # a preemption: the group restarts and resumes
  {kubectl} logs sentiment-minilm-0

S3 (moto): {cluster.s3_endpoint}  bucket {BUCKET}, checkpoints under {CHECKPOINT_URI}
           (AWS_ACCESS_KEY_ID={ACCESS_KEY} AWS_SECRET_ACCESS_KEY={SECRET_KEY})
           faults: curl -d '{{"status": 503, "seconds": 60}}' {cluster.s3_endpoint}{CONTROL_PATH}
operator metrics: http://127.0.0.1:{cluster.operator_metrics_port}/metrics
logs: {cluster.logs}
Ctrl-C stops everything.""", flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, request_stop)
        while not stop:
            for proc in (cluster.api, cluster.executor, cluster.operator):
                if proc is not None and not proc.running:
                    print(f"{proc.name} exited ({proc.proc.returncode}); see {proc.log_path}", file=sys.stderr)
                    return 1
            time.sleep(0.5)
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="kubetrain dev-cluster", description="an API server, pod executor, operator and S3 on this machine")
    add_arguments(p)
    args = p.parse_args(argv)
    return run_dev_cluster(Path(args.state_dir), args.nodes, args.image_root)


def add_arguments(p) -> None:
    p.add_argument("--state-dir", default=".runs/dev-cluster", help="kubeconfig, logs and pod directories")
    p.add_argument("--nodes", type=int, default=2, help="simulated nodes")
    p.add_argument("--image-root", type=Path, help=f"what pods see as {IMAGE_ROOT} (default: the current directory)")
