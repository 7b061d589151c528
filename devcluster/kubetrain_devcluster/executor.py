"""The local pod executor: a kubelet + scheduler stand-in that runs Pod objects as local processes.

It watches Pods and Nodes over HTTP, binds pods to its simulated nodes (`scheduling.py`), runs each
pod's first container as a local process group (`podrun.py`: env, volumes, DNS stand-in, launch,
supervision, status), and removes pods once their processes are gone. What it does in the order a
pod sees it, and every deliberate difference from a kubelet, are in docs/dev-cluster.md.

``python -m kubetrain_devcluster.executor --kubeconfig K --state-dir D [--nodes N] ...``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp

from .apiclient import ApiClient, ApiError, is_transient, pod_path
from .ipam import IpAllocator
from .launch import LaunchContext, base_env
from .machine import machine_memory_bytes
from .nodes import NodesMixin
from .objects import Pod, is_deleting, is_terminal, meta, now_rfc3339, pod_key, spec, status
from .podrun import PodRun, RunnerMixin
from .podstatus import condition, container_status, stamp_conditions
from .scheduling import SchedulerMixin

log = logging.getLogger("kubetrain_devcluster.executor")

READY_LINE = "kubetrain executor ready ({n} nodes)"


@dataclasses.dataclass
class ExecutorOptions:
    """How the executor behaves; every field has a CLI flag or a sensible default."""

    state_dir: Path
    nodes: int = 1
    node_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    image_roots: Mapping[str, str] = dataclasses.field(default_factory=dict)
    extra_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    log_dir: Path | None = None
    python: str = sys.executable
    node_prefix: str = "local"
    shutdown_grace: float = 5.0
    schedule_interval: float = 1.0
    config_retry_interval: float = 1.0
    dns_retry_interval: float = 0.5
    watch_retry_interval: float = 0.5

    @property
    def logs(self) -> Path:
        return Path(self.log_dir) if self.log_dir else Path(self.state_dir) / "logs"

    def node_names(self) -> list[str]:
        return [f"{self.node_prefix}-{i}" for i in range(self.nodes)]



class PodExecutor(NodesMixin, SchedulerMixin, RunnerMixin):
    """Runs the Pods bound to its fake nodes as local processes; see the module docstring."""

    def __init__(self, api: ApiClient | str, options: ExecutorOptions):
        self.api = ApiClient(api) if isinstance(api, str) else api
        self.options = options
        self.node_names = options.node_names()
        self.ready = asyncio.Event()
        self._ctx = LaunchContext(image_roots=dict(options.image_roots), extra_env=dict(options.extra_env),
                                  python=options.python, base_env=base_env())
        self._pods: dict[str, Pod] = {}  # uid -> latest pod seen
        self._uid_by_key: dict[tuple[str, str], str] = {}
        self._runs: dict[str, PodRun] = {}
        self._nodes: dict[str, dict[str, Any]] = {}  # our live nodes, latest object
        self._lost: set[str] = set()
        self._handled: set[str] = set()  # uids given a one-shot treatment (removal, NodeRestarted, NodeLost)
        self._binding: set[str] = set()
        self._rr = itertools.count()
        self._ips = IpAllocator()
        self._memory = machine_memory_bytes()
        self._schedule_wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        self._pods_synced = asyncio.Event()
        self._nodes_synced = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._running = False

    # ---- lifecycle of the executor

    async def run(self) -> None:
        """Register nodes, watch pods and nodes, schedule, until stop() or cancellation; then stop all pods."""
        loops: list[asyncio.Task[None]] = []
        self._running = True
        await self.api.open()
        try:
            await self._register_nodes()
            loops = [
                asyncio.create_task(self._watch_forever(
                    "/api/v1/pods", self._on_pod_list, self._on_pod_event, self._pods_synced)),
                asyncio.create_task(self._watch_forever(
                    "/api/v1/nodes", self._on_node_list, self._on_node_event, self._nodes_synced)),
                asyncio.create_task(self._schedule_loop()),
            ]
            await self._pods_synced.wait()
            await self._nodes_synced.wait()
            self.ready.set()
            log.info("executor ready: nodes %s", ", ".join(self.node_names))
            await self._stopping.wait()
        finally:
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self._shutdown()
            await self.api.close()
            self._stopped.set()

    async def stop(self) -> None:
        """Ask run() to stop every pod and return; waits for it when it is running."""
        self._stopping.set()
        if self._running:
            await self._stopped.wait()

    def request_stop(self) -> None:
        """stop() for signal handlers, which cannot await."""
        self._stopping.set()

    async def _shutdown(self) -> None:
        """SIGTERM every process group, SIGKILL after the shutdown grace; then mark our nodes NotReady."""
        for task in list(self._background):
            task.cancel()
        runs = [r for r in self._runs.values() if r.active]
        for run in runs:
            run.shutdown = True
            run.request_stop(self.options.shutdown_grace)
        tasks = [r.task for r in runs if r.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.options.shutdown_grace + 5)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(self._mark_node_not_ready(n) for n in self._nodes), return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        """A fire-and-forget task that is cancelled on shutdown and whose errors are logged."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("background task failed", exc_info=t.exception())

        task.add_done_callback(done)

    # ---- watches

    async def _watch_forever(self, path: str, on_list: Callable[[list[dict[str, Any]]], Awaitable[None]],
                             on_event: Callable[[str, dict[str, Any]], Awaitable[None]], synced: asyncio.Event) -> None:
        """List then watch, forever; any error or end of stream re-lists (so no event is missed)."""
        while True:
            try:
                listing = await self.api.request("GET", path)
                await on_list(list(listing.get("items") or []))
                synced.set()
                params = {"allowWatchBookmarks": "true"}
                version = meta(listing).get("resourceVersion")
                if version:
                    params["resourceVersion"] = str(version)
                async with contextlib.aclosing(self.api.watch(path, params)) as events:
                    async for event in events:
                        kind, obj = event.get("type", ""), event.get("object") or {}
                        if kind == "ERROR":
                            log.info("watch %s: %s; re-listing", path, obj.get("message"))
                            break
                        if kind in ("ADDED", "MODIFIED", "DELETED"):
                            await on_event(kind, obj)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the watch must survive any server hiccup
                log.info("watch %s failed (%s: %s); retrying", path, type(e).__name__, e)
            await asyncio.sleep(self.options.watch_retry_interval)

    async def _on_pod_list(self, items: list[Pod]) -> None:
        uids = {meta(p).get("uid", "") for p in items}
        for uid, pod in list(self._pods.items()):
            if uid not in uids:
                await self._on_pod_event("DELETED", pod)
        for pod in items:
            await self._on_pod_event("ADDED", pod)

    async def _on_pod_event(self, kind: str, pod: Pod) -> None:
        uid = meta(pod).get("uid", "")
        key = pod_key(pod)
        if kind == "DELETED":
            self._forget_pod(uid, key)
            return
        self._pods[uid] = pod
        self._uid_by_key[key] = uid
        self._reconcile(pod)

    def _forget_pod(self, uid: str, key: tuple[str, str]) -> None:
        """The pod object is gone: a still running process is killed at once (force delete)."""
        self._pods.pop(uid, None)
        if self._uid_by_key.get(key) == uid:
            del self._uid_by_key[key]
        run = self._runs.pop(uid, None)
        if run is not None and run.active:
            log.info("pod %s/%s was removed while running: killing it", run.namespace, run.name)
            run.gone = True
            run.request_stop(0)
        self._handled.discard(uid)
        self._schedule_wake.set()  # DNS waits and unschedulable pods may change

    def _wake_waiting_runs(self) -> None:
        for run in self._runs.values():
            if run.active and run.proc is None:
                run.wake.set()

    # ---- reconcile: what to do with a pod we see

    def _reconcile(self, pod: Pod) -> None:
        """Decide what the pod needs from us; never blocks (work goes to tasks)."""
        uid = meta(pod).get("uid", "")
        node = spec(pod).get("nodeName")
        run = self._runs.get(uid)
        if uid in self._binding:
            return
        if run is not None:
            run.update(pod)
            if not run.active and is_deleting(pod) and not run.removing:
                run.removing = True
                self._spawn(self._remove(run.namespace, run.name, uid))
            return
        if not node:
            if not is_terminal(pod) and not is_deleting(pod):
                self._schedule_wake.set()
            return
        if node not in self.node_names or uid in self._handled:
            return
        self._wake_waiting_runs()  # a pod with a hostname may have appeared
        if is_terminal(pod):
            if is_deleting(pod):
                self._handled.add(uid)
                self._spawn(self._remove(*pod_key(pod), uid))
        elif node in self._lost:
            self._handled.add(uid)
            message = f"Node {node} which was running pod {pod_key(pod)[1]} is unresponsive"
            self._spawn(self._fail_and_remove(pod, "NodeLost", message, lost=True))
        elif is_deleting(pod):
            self._handled.add(uid)
            self._spawn(self._remove(*pod_key(pod), uid))
        elif status(pod).get("podIP") or status(pod).get("startTime"):
            self._handled.add(uid)
            message = f"the executor of node {node} restarted; the pod's process is gone"
            self._spawn(self._fail_and_remove(pod, "NodeRestarted", message))
        else:
            self._start_run(pod, node)

    def _start_run(self, pod: Pod, node: str) -> None:
        namespace, name = pod_key(pod)
        uid = meta(pod).get("uid", "")
        pod_dir = Path(self.options.state_dir) / "pods" / namespace / f"{name}-{uid[:8]}"
        log_file = self.options.logs / namespace / f"{name}_{uid}.log"
        run = PodRun(pod, node, self._ips.allocate(), pod_dir, log_file)
        self._runs[uid] = run
        run.task = asyncio.create_task(self._run_pod(run))
        self._wake_waiting_runs()

    # ---- status and removal

    async def _patch_pod_status(self, namespace: str, name: str, uid: str, body: dict[str, Any],
                                attempts: int = 5, timeout: float | None = None) -> Pod | None:
        """Patch /status, unless the name now belongs to a newer pod; None when the pod is gone.

        Transient failures (5xx, 429, connection errors) are retried with a short backoff.
        """
        for attempt in range(attempts):
            current = self._uid_by_key.get((namespace, name))
            if current is not None and current != uid:
                return None
            try:
                return await self.api.strategic_patch(pod_path(namespace, name, "/status"), {"status": body}, timeout)
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                if isinstance(e, ApiError) and e.status == 404:
                    return None
                if not is_transient(e) or attempt + 1 == attempts:
                    raise
            await asyncio.sleep(0.2 * (attempt + 1))
        return None

    async def _write_status(self, run: PodRun, body: dict[str, Any], our_conditions: list[dict[str, Any]],
                            attempts: int = 5, timeout: float | None = None) -> None:
        """Write a run's status; conditions written by others (DisruptionTarget) are kept by the strategic merge."""
        if run.gone:
            return
        current = self._pods.get(run.uid, run.pod)
        body = {**body, "conditions": stamp_conditions(status(current).get("conditions") or [], our_conditions, now_rfc3339())}
        try:
            await self._patch_pod_status(run.namespace, run.name, run.uid, body, attempts, timeout)
        except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as e:
            log.warning("pod %s/%s: status write failed: %s", run.namespace, run.name, e)

    async def _remove(self, namespace: str, name: str, uid: str) -> None:
        """DELETE with grace 0 and the uid as precondition: never removes a newer pod of that name."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        for attempt in range(5):
            try:
                await self.api.request("DELETE", pod_path(namespace, name), body)
                log.info("pod %s/%s removed", namespace, name)
                return
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                if isinstance(e, ApiError) and e.status in (404, 409):
                    return  # gone already, or the name belongs to a newer pod
                log.warning("removing pod %s/%s failed: %s", namespace, name, e)
                if not is_transient(e):
                    return
            await asyncio.sleep(0.2 * (attempt + 1))

    async def _fail_and_remove(self, pod: Pod, reason: str, message: str, lost: bool = False,
                               container_statuses: list[dict[str, Any]] | None = None) -> None:
        """A pod whose process is not ours (previous executor) or whose node was lost: Failed, then removed."""
        namespace, name = pod_key(pod)
        uid = meta(pod).get("uid", "")
        container = (spec(pod).get("containers") or [{}])[0]
        updates = [condition("Ready", False, "PodFailed"), condition("ContainersReady", False, "PodFailed")]
        if lost:
            updates.append(condition("DisruptionTarget", True, "DeletionByTaintManager",
                                     "Taint manager: deleting due to NoExecute taint"))
        body: dict[str, Any] = {
            "phase": "Failed", "reason": reason, "message": message,
            "conditions": stamp_conditions(status(pod).get("conditions") or [], updates, now_rfc3339()),
        }
        if container_statuses:
            body["containerStatuses"] = container_statuses
        elif status(pod).get("containerStatuses"):
            unknown = {"exitCode": 137, "reason": "ContainerStatusUnknown",
                       "message": "The container could not be located when the pod was terminated",
                       "finishedAt": now_rfc3339()}
            body["containerStatuses"] = [container_status(container, {"terminated": unknown})]
        with contextlib.suppress(ApiError, aiohttp.ClientError, asyncio.TimeoutError):
            await self._patch_pod_status(namespace, name, uid, body)
        await self._remove(namespace, name, uid)

# --------------------------------------------------------------------------------------------------
# command line


def parse_pairs(values: list[str] | None, flag: str) -> dict[str, str]:
    """`k=v` flags as a dict (the first `=` splits)."""
    out: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kubetrain_devcluster.executor",
                                     description="Run the dev cluster's Pods as local processes (a kubelet stand-in).")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--kubeconfig", help="kubeconfig of the API server (current context)")
    target.add_argument("--api", help="API server URL, e.g. http://127.0.0.1:8001")
    parser.add_argument("--state-dir", required=True, type=Path, help="pod directories, volumes, logs")
    parser.add_argument("--nodes", type=int, default=1, help="how many Node objects to register (local-0..)")
    parser.add_argument("--node-prefix", default="local", help="node names are <prefix>-0, <prefix>-1, ...")
    parser.add_argument("--node-label", action="append", metavar="K=V", help="extra label on every node")
    parser.add_argument("--image-root", action="append", metavar="IMAGE_PATH=LOCAL_DIR",
                        help="map an image path to a local directory, e.g. /opt/kubetrain=/work/main")
    parser.add_argument("--env", action="append", metavar="K=V", help="extra env var for every pod")
    parser.add_argument("--log-dir", type=Path, help="pod logs (default <state-dir>/logs)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for `python` commands")
    parser.add_argument("--shutdown-grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL on exit")
    parser.add_argument("--log-level", default="INFO")
    return parser


def options_from_args(args: argparse.Namespace) -> ExecutorOptions:
    return ExecutorOptions(
        state_dir=args.state_dir, nodes=args.nodes, node_labels=parse_pairs(args.node_label, "--node-label"),
        image_roots=parse_pairs(args.image_root, "--image-root"), extra_env=parse_pairs(args.env, "--env"),
        log_dir=args.log_dir, python=args.python, shutdown_grace=args.shutdown_grace, node_prefix=args.node_prefix,
    )


async def main_async(args: argparse.Namespace) -> int:
    api = ApiClient.from_kubeconfig(args.kubeconfig) if args.kubeconfig else ApiClient(args.api)
    executor = PodExecutor(api, options_from_args(args))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, executor.request_stop)
    running = asyncio.create_task(executor.run())
    ready = asyncio.create_task(executor.ready.wait())
    await asyncio.wait({running, ready}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
        print(READY_LINE.format(n=len(executor.node_names)), flush=True)
    else:
        ready.cancel()
    await running
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
