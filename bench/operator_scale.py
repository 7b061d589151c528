"""The operator at scale: many TrainingJobs on one operator, in the dev cluster (API server and operator, real HTTP).

No trainer runs: a stand-in kubelet in this process marks every pod Running with a loopback IP of its own, and
one HTTP server on 0.0.0.0 answers every pod's /metrics the way a trainer's rank 0 does (step, total steps,
tokens/s), so the operator's progress scrapes and status writes happen as in a real cluster.

Measured (issue 18, item 6):
- burst: `--burst` jobs created at once from 8 client threads; per job, from its create call to all of its pods
  existing (seen on a pod watch); p50/p99/max;
- the operator's API calls from the first create until every job is Running, by verb and resource, per job;
- idle: once every job is Running, the operator process's CPU (utime+stime from /proc) over `--window` seconds,
  as % of one core per 100 running jobs, with its API calls per second (from the API server's audit log) and RSS;
- the same idle figures again at `--total` jobs (default 1,000), and the operator's RSS there.

    python bench/operator_scale.py --burst 200 --total 1000 --window 60 --out bench/results/operator_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from kubetrain.contracts import TrainerMetric as M
from kubetrain.ports import free_port
from kubetrain_devcluster.cluster import DevCluster
from kubetrain_testkit.clusterkit import NS, tiny_job
from kubetrain_testkit.polling import wait_for

NODES = 2  # pods per job
TOTAL_STEPS = 1_000_000


class TrainerMetrics(BaseHTTPRequestHandler):
    """Every pod's rank 0: a step that grows with time, so each scrape brings new progress to write."""

    started = time.time()

    def do_GET(self):  # noqa: N802 - http.server's name
        step = int((time.time() - self.started) * 10)
        body = (f"{M.STEP} {step}\n{M.TOTAL_STEPS} {TOTAL_STEPS}\n{M.TOKENS_PER_SECOND} 12345.0\n"
                f"{M.ETA_SECONDS} {(TOTAL_STEPS - step) / 10}\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_):
        pass


class Kubelet:
    """Marks each new pod Running with its own 127.x.y.z address; records when each pod was first seen."""

    def __init__(self, cluster: DevCluster):
        self.core = cluster.core_api()
        self.seen: dict[str, float] = {}  # pod name -> first seen (monotonic)
        self._ips = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="kubelet")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> Kubelet:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _watch(self) -> None:
        import kubernetes

        resource_version = None
        while not self._stop.is_set():
            try:
                for event in kubernetes.watch.Watch().stream(self.core.list_namespaced_pod, NS, timeout_seconds=60,
                                                             resource_version=resource_version):
                    pod = event["object"]
                    resource_version = pod.metadata.resource_version
                    if event["type"] == "ADDED" and pod.metadata.name not in self.seen:
                        self.seen[pod.metadata.name] = time.monotonic()
                        self._pool.submit(self._run, pod.metadata.name)
            except Exception:  # noqa: BLE001 - a broken watch is opened again, from where it was
                time.sleep(0.2)

    def _run(self, name: str) -> None:
        with self._lock:
            self._ips += 1
            n = self._ips
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = {"phase": "Running", "podIP": f"127.{1 + n // 62500}.{n // 250 % 250}.{1 + n % 250}", "startTime": now,
                  "containerStatuses": [{"name": "trainer", "ready": True, "restartCount": 0, "image": "t", "imageID": "",
                                         "state": {"running": {"startedAt": now}}}]}
        for _ in range(5):
            try:
                self.core.patch_namespaced_pod_status(name, NS, {"status": status})
                return
            except Exception:  # noqa: BLE001 - retried
                time.sleep(0.5)


def process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def create_jobs(cluster: DevCluster, names: list[str], metrics_port: int) -> dict[str, float]:
    """Create every job at once from 8 threads; returns each one's create time (monotonic, before its call)."""
    api = cluster.custom_api()
    corpus = {"train": Path("/data/train.jsonl"), "eval": Path("/data/eval.jsonl"), "tokenizer": Path("/data/tok")}
    started: dict[str, float] = {}

    def one(name: str) -> None:
        doc = tiny_job(cluster, corpus, name, training__maxSteps=TOTAL_STEPS, metrics={"port": metrics_port})
        started[name] = time.monotonic()
        api.create_namespaced_custom_object("kubetrain.io", "v1alpha1", NS, "trainingjobs", doc)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, names))
    return started


def all_pods_latencies(kubelet: Kubelet, started: dict[str, float], timeout: float) -> list[float]:
    pods = lambda name: [f"{name}-{r}" for r in range(NODES)]  # noqa: E731
    wait_for("every job's pods", lambda: all(p in kubelet.seen for n in started for p in pods(n)), timeout, lambda: (
        f"{sum(all(p in kubelet.seen for p in pods(n)) for n in started)} of {len(started)} jobs have their pods"),
        interval=0.2)
    return [max(kubelet.seen[p] for p in pods(n)) - t for n, t in started.items()]


def running_jobs(cluster: DevCluster) -> int:
    items = cluster.custom_api().list_namespaced_custom_object("kubetrain.io", "v1alpha1", NS, "trainingjobs")["items"]
    return sum((j.get("status") or {}).get("phase") == "Running" for j in items)


def calls_by_verb(calls: list[dict]) -> dict[str, int]:
    by_verb: dict[str, int] = {}
    for call in calls:
        key = f"{call.get('verb')} {call.get('resource')}"
        by_verb[key] = by_verb.get(key, 0) + 1
    return by_verb


def idle(cluster: DevCluster, jobs: int, window: float, settle: float, profile: Path | None = None) -> dict:
    """The operator's cost with `jobs` Running jobs and nothing else happening; `profile`: py-spy's collapsed
    stacks of the operator over the window, written there (where its CPU goes)."""
    wait_for(f"{jobs} jobs Running", lambda: running_jobs(cluster) >= jobs, 600, lambda: f"{running_jobs(cluster)} Running",
             interval=2)
    time.sleep(settle)
    pid = cluster.operator.proc.pid
    calls_before, cpu_before, t0 = len(cluster.requests_by("operator")), process_cpu_seconds(pid), time.monotonic()
    if profile:
        subprocess.run(["py-spy", "record", "--pid", str(pid), "--duration", str(int(window)), "--rate", "100",
                        "--format", "raw", "--output", str(profile), "--nonblocking"], check=True, capture_output=True)
    time.sleep(max(0.0, window - (time.monotonic() - t0)))
    cpu, elapsed = process_cpu_seconds(pid) - cpu_before, time.monotonic() - t0
    calls = cluster.requests_by("operator")[calls_before:]
    by_verb = calls_by_verb(calls)
    items = cluster.custom_api().list_namespaced_custom_object("kubetrain.io", "v1alpha1", NS, "trainingjobs")["items"]
    now_step = (time.time() - TrainerMetrics.started) * 10  # what every trainer says now: status.step's lag in seconds
    ages = [(now_step - j["status"]["step"]) / 10 for j in items if (j.get("status") or {}).get("step")]
    return {"running_jobs": jobs, "window_s": round(elapsed, 1), "operator_cpu_s": round(cpu, 2),
            "operator_core_percent": round(100 * cpu / elapsed, 2),
            "operator_core_percent_per_100_jobs": round(100 * cpu / elapsed * 100 / jobs, 2),
            "operator_api_calls_per_s": round(len(calls) / elapsed, 1), "operator_api_calls_by_verb": by_verb,
            "operator_rss_mib": round(rss_mib(pid), 1),
            "status_step_lag_s": {"p50": round(statistics.median(ages), 1), "max": round(max(ages), 1)} if ages else None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--burst", type=int, default=200)
    p.add_argument("--total", type=int, default=1000)
    p.add_argument("--window", type=float, default=60)
    p.add_argument("--settle", type=float, default=20)
    p.add_argument("--out", type=Path)
    p.add_argument("--profile", type=Path, help="a folder for py-spy's collapsed stacks of the operator (idle windows)")
    args = p.parse_args(argv)

    metrics_port = free_port()
    server = ThreadingHTTPServer(("0.0.0.0", metrics_port), TrainerMetrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    result: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.node(),
                    "cpus": os.cpu_count(), "nodes_per_job": NODES, "argv": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory() as state, DevCluster(Path(state), executor=False) as cluster:
        kubelet = Kubelet(cluster).start()
        try:
            names = [f"burst-{i:04d}" for i in range(args.burst)]
            pids = {"api_server": cluster.api.proc.pid, "operator": cluster.operator.proc.pid, "bench": os.getpid()}
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
                spies = [subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", "20", "--rate", "100",
                                           "--format", "raw", "--output", str(args.profile / f"{who}-burst.txt"),
                                           "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                         for who, pid in pids.items() if who != "bench"]
            calls_before = len(cluster.requests_by("operator"))
            cpu_before, t0 = {who: process_cpu_seconds(pid) for who, pid in pids.items()}, time.monotonic()
            started = create_jobs(cluster, names, metrics_port)
            created = time.monotonic() - t0
            latencies = all_pods_latencies(kubelet, started, 600)
            wait_for(f"{len(names)} jobs Running", lambda: running_jobs(cluster) >= len(names), 600,
                     lambda: f"{running_jobs(cluster)} Running", interval=0.5)
            to_running = cluster.requests_by("operator")[calls_before:]
            result["burst"] = {"jobs": len(names), "create_calls_s": round(created, 2),
                               "all_pods_s": round(max(kubelet.seen.values()) - t0, 2),
                               "cpu_s": {who: round(process_cpu_seconds(pid) - cpu_before[who], 2) for who, pid in pids.items()},
                               **{k: round(v, 3) for k, v in (("p50_s", percentile(latencies, .5)),
                                                              ("p99_s", percentile(latencies, .99)),
                                                              ("max_s", max(latencies)))},
                               "operator_calls_to_running_per_job": round(len(to_running) / len(names), 1),
                               "operator_calls_to_running_by_verb": calls_by_verb(to_running)}
            if args.profile:
                for spy in spies:
                    spy.wait()
            print(json.dumps(result["burst"]), flush=True)
            profile = lambda jobs: args.profile / f"operator-idle-{jobs}.txt" if args.profile else None  # noqa: E731
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
            result["idle"] = [idle(cluster, len(names), args.window, args.settle, profile(len(names)))]
            print(json.dumps(result["idle"][-1]), flush=True)
            if args.total > args.burst:
                more = [f"more-{i:04d}" for i in range(args.total - args.burst)]
                for start in range(0, len(more), 100):  # in batches, as users come
                    batch = more[start:start + 100]
                    all_pods_latencies(kubelet, create_jobs(cluster, batch, metrics_port), 600)
                result["idle"].append(idle(cluster, args.total, args.window, args.settle, profile(args.total)))
                print(json.dumps(result["idle"][-1]), flush=True)
            # the same jobs a window later: memory that grew with time rather than with jobs would show here
            result["idle"].append(idle(cluster, max(args.total, args.burst), args.window, 0))
            print(json.dumps(result["idle"][-1]), flush=True)
        finally:
            kubelet.stop()
            server.shutdown()
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
