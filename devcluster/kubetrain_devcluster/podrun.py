"""One pod the executor runs, from sandbox to removal: its process, its stop requests, its status."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp

from .apiclient import ApiError
from .dns import DnsPending, dns_table
from .launch import Launch, build_launch
from .objects import HOST_IP, Pod, deletion_grace, is_deleting, meta, now_rfc3339, pod_key, spec, status
from .podenv import ConfigError, PodFacts, SourceKey, referenced_sources, resolve_env, source_data
from .podstatus import condition, container_status, terminated_state, termination_message
from .volumes import materialize_volumes, mount_paths

log = logging.getLogger("kubetrain_devcluster.executor")


class PodRun:
    """One pod this executor runs: its sandbox, process and stop requests (kept until the pod is gone)."""

    def __init__(self, pod: Pod, node: str, ip: str, pod_dir: Path, log_file: Path):
        self.pod = pod
        self.uid: str = meta(pod).get("uid", "")
        self.namespace, self.name = pod_key(pod)
        self.node = node
        self.ip = ip
        self.pod_dir = pod_dir
        self.log_file = log_file
        self.container: dict[str, Any] = (spec(pod).get("containers") or [{}])[0]
        self.proc: asyncio.subprocess.Process | None = None
        self.container_id: str | None = None
        self.started_at: str | None = None
        self.returncode: int | None = None
        self.start_error: str | None = None
        self.termination_file: Path | None = None
        self.stop_deadline: float | None = None
        self.gone = False  # the pod object no longer exists
        self.node_lost = False
        self.shutdown = False
        self.removing = False
        self.waiting: tuple[str, str] | None = None
        self.start_time: str = status(pod).get("startTime") or now_rfc3339()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def deletion_requested(self) -> bool:
        return is_deleting(self.pod)

    @property
    def stop_requested(self) -> bool:
        return self.stop_deadline is not None

    @property
    def active(self) -> bool:
        return self.task is not None and not self.task.done()

    def update(self, pod: Pod) -> None:
        """A newer version of the pod; a deletionTimestamp asks the process to stop within its grace."""
        self.pod = pod
        if is_deleting(pod):
            self.request_stop(deletion_grace(pod))

    def request_stop(self, grace: float) -> None:
        """Stop within `grace` seconds from now; a shorter later request wins, as with kubelet."""
        deadline = time.monotonic() + max(0.0, grace)
        self.stop_deadline = deadline if self.stop_deadline is None else min(self.stop_deadline, deadline)
        self.wake.set()

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake early when something about the pod changes."""
        self.wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.wake.wait(), seconds)

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


class RunnerMixin:
    """The executor's part that runs one pod: sandbox, config, process, supervision, final status."""


    async def _run_pod(self, run: PodRun) -> None:
        try:
            await self._start_sandbox(run)
            launch = await self._prepare_launch(run)
            if launch is not None and await self._start_process(run, launch):
                await self._supervise(run)
            await self._report_end(run)
        except asyncio.CancelledError:
            run.signal_group(signal.SIGKILL)
            raise
        except Exception:  # noqa: BLE001 - a bug here must not kill the executor
            log.exception("pod %s/%s: executor error", run.namespace, run.name)
            run.signal_group(signal.SIGKILL)
        finally:
            self._ips.release(run.ip)

    async def _start_sandbox(self, run: PodRun) -> None:
        """The pod directory and IP; status Pending with podIP (kubelet sets the IP before containers start)."""
        for sub in ("home", "tmp", "volumes"):
            (run.pod_dir / sub).mkdir(parents=True, exist_ok=True)
        extra = [c.get("name") for c in (spec(run.pod).get("containers") or [])[1:]]
        if extra or spec(run.pod).get("initContainers"):
            log.warning("pod %s/%s: only container %r runs (ignored: %s)", run.namespace, run.name,
                        run.container.get("name"), extra + [c.get("name") for c in spec(run.pod).get("initContainers") or []])
        if spec(run.pod).get("restartPolicy", "Always") != "Never":
            log.warning("pod %s/%s: restartPolicy %s is treated as Never", run.namespace, run.name,
                        spec(run.pod).get("restartPolicy", "Always"))
        log.info("pod %s/%s on %s gets IP %s", run.namespace, run.name, run.node, run.ip)
        await self._write_status(run, self._pending_status(run, {"reason": "ContainerCreating"}),
                                 self._not_ready_conditions())

    def _pending_status(self, run: PodRun, waiting: Mapping[str, str]) -> dict[str, Any]:
        return {"phase": "Pending", "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}], "podIP": run.ip,
                "podIPs": [{"ip": run.ip}], "startTime": run.start_time,
                "containerStatuses": [container_status(run.container, {"waiting": dict(waiting)})]}

    @staticmethod
    def _not_ready_conditions() -> list[dict[str, Any]]:
        return [condition("PodScheduled", True), condition("Initialized", True),
                condition("ContainersReady", False, "ContainersNotReady", "containers with unready status"),
                condition("Ready", False, "ContainersNotReady", "containers with unready status")]

    async def _prepare_launch(self, run: PodRun) -> Launch | None:
        """Resolve env, volumes and DNS names, retrying until they resolve; None when stopped first."""
        while not run.stop_requested:
            try:
                return await self._try_launch(run)
            except ConfigError as e:
                await self._report_waiting(run, e.reason, e.message)
                delay = self.options.config_retry_interval
            except DnsPending as e:
                await self._report_waiting(run, "ContainerCreating", str(e))
                delay = self.options.dns_retry_interval
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                log.info("pod %s/%s: reading its config failed (%s); retrying", run.namespace, run.name, e)
                delay = self.options.config_retry_interval
            await run.sleep(delay)
        return None

    async def _try_launch(self, run: PodRun) -> Launch:
        sources = await self._fetch_sources(run)
        facts = PodFacts(pod_ip=run.ip, node_name=run.node, node_memory=self._memory)
        pvc_root = Path(self.options.state_dir) / "pvc"
        volumes = materialize_volumes(run.pod, run.pod_dir, pvc_root, sources, facts)
        mounts = mount_paths(run.container, volumes)
        env = resolve_env(run.pod, run.container, sources, facts)
        ips = {uid: r.ip for uid, r in self._runs.items() if r.active}
        return build_launch(run.pod, run.container, env, mounts, run.pod_dir, dns_table(self._pods.values(), ips), self._ctx)

    async def _fetch_sources(self, run: PodRun) -> dict[SourceKey, dict[str, bytes] | None]:
        """The Secrets/ConfigMaps the pod reads, fetched now (kubelet reads them at container start too)."""
        out: dict[SourceKey, dict[str, bytes] | None] = {}
        for kind, name in sorted(referenced_sources(run.pod, run.container)):
            plural = "secrets" if kind == "secret" else "configmaps"
            obj = await self.api.get(f"/api/v1/namespaces/{run.namespace}/{plural}/{name}") if name else None
            out[(kind, name)] = None if obj is None else source_data(kind, obj)
        return out

    async def _report_waiting(self, run: PodRun, reason: str, message: str) -> None:
        if run.waiting == (reason, message):
            return
        run.waiting = (reason, message)
        log.info("pod %s/%s waits: %s: %s", run.namespace, run.name, reason, message)
        await self._write_status(run, self._pending_status(run, {"reason": reason, "message": message}),
                                 self._not_ready_conditions())

    async def _start_process(self, run: PodRun, launch: Launch) -> bool:
        """Spawn the container process in its own session; a spawn error is a StartError (exit 128)."""
        if run.stop_requested:
            return False
        if not launch.argv:
            run.start_error = "no command specified (the local image has no entrypoint)"
            return False
        run.termination_file = launch.termination_file
        launch.termination_file.write_bytes(b"")
        for path in (launch.cwd, Path(launch.env.get("TMPDIR", run.pod_dir)), run.log_file.parent):
            path.mkdir(parents=True, exist_ok=True)
        run.started_at = now_rfc3339()
        with open(run.log_file, "ab") as out:
            try:
                run.proc = await asyncio.create_subprocess_exec(
                    *launch.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=asyncio.subprocess.STDOUT,
                    env=launch.env, cwd=str(launch.cwd), start_new_session=True)
            except OSError as e:
                run.start_error = f"failed to start {launch.argv[0]!r}: {e}"
                out.write(f"{run.start_error}\n".encode())
                log.warning("pod %s/%s: %s", run.namespace, run.name, run.start_error)
                return False
        run.container_id = f"local://{run.proc.pid}"
        log.info("pod %s/%s started: pid %d: %s", run.namespace, run.name, run.proc.pid, " ".join(launch.argv)[:300])
        running = container_status(run.container, {"running": {"startedAt": run.started_at}}, ready=True,
                                   started=True, container_id=run.container_id)
        await self._write_status(run, {"phase": "Running", "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}],
                                       "podIP": run.ip, "podIPs": [{"ip": run.ip}],
                                       "startTime": run.start_time,
                                       "containerStatuses": [running]},
                                 [condition("PodScheduled", True), condition("Initialized", True),
                                  condition("ContainersReady", True), condition("Ready", True)])
        return True

    async def _supervise(self, run: PodRun) -> None:
        """Wait for the exit; on a stop request SIGTERM the group, SIGKILL it at the deadline."""
        assert run.proc is not None
        exited = asyncio.ensure_future(run.proc.wait())
        term_sent = kill_sent = False
        try:
            while not exited.done():
                run.wake.clear()
                now = time.monotonic()
                if run.stop_deadline is not None and not kill_sent:
                    if now >= run.stop_deadline:
                        run.signal_group(signal.SIGKILL)
                        kill_sent = term_sent = True
                    elif not term_sent:
                        run.signal_group(signal.SIGTERM)
                        term_sent = True
                timeout = None if run.stop_deadline is None or kill_sent else max(0.0, run.stop_deadline - now)
                woken = asyncio.ensure_future(run.wake.wait())
                await asyncio.wait({exited, woken}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
        finally:
            run.signal_group(signal.SIGKILL)  # the rest of the group dies with the main process
            if not exited.done():
                exited.cancel()
        run.returncode = run.proc.returncode
        log.info("pod %s/%s exited with %s", run.namespace, run.name, run.returncode)

    async def _report_end(self, run: PodRun) -> None:
        """The final status for why the run ended, then removal when the pod is being deleted or its node is lost."""
        if run.gone:
            return
        if run.node_lost:
            await self._fail_and_remove(
                self._pods.get(run.uid, run.pod), "NodeLost",
                f"Node {run.node} which was running pod {run.name} is unresponsive", lost=True,
                container_statuses=self._final_container_status(run).get("containerStatuses"))
            return
        if run.proc is None and run.start_error is None:
            if run.deletion_requested:
                await self._remove(run.namespace, run.name, run.uid)
            return  # stopped before it started (deletion, or executor shutdown)
        body = {"phase": "Succeeded" if run.returncode == 0 else "Failed", **self._final_container_status(run)}
        if run.shutdown:
            body.update(phase="Failed", reason="Terminated",
                        message="Pod was terminated in response to imminent node shutdown.")
        conditions = [condition("ContainersReady", False, "PodCompleted" if run.returncode == 0 else "PodFailed"),
                      condition("Ready", False, "PodCompleted" if run.returncode == 0 else "PodFailed")]
        if run.shutdown:
            conditions.append(condition("DisruptionTarget", True, "TerminationByKubelet",
                                        "Pod was terminated in response to imminent node shutdown."))
        if run.shutdown:
            await self._write_status(run, body, conditions, attempts=1, timeout=2)
        else:
            await self._write_status(run, body, conditions)
        if run.deletion_requested and not run.shutdown:
            run.removing = True
            await self._remove(run.namespace, run.name, run.uid)

    def _final_container_status(self, run: PodRun) -> dict[str, Any]:
        """containerStatuses with state.terminated (or StartError when the process never started)."""
        finished = now_rfc3339()
        if run.start_error is not None:
            state = {"exitCode": 128, "reason": "StartError", "message": run.start_error,
                     "startedAt": run.started_at, "finishedAt": finished}
        elif run.returncode is not None:
            failed = run.returncode != 0
            message = termination_message(run.termination_file or run.pod_dir / "termination-log", run.log_file,
                                          run.container.get("terminationMessagePolicy"), failed)
            state = terminated_state(run.returncode, message, run.started_at, finished, run.container_id)
        else:
            return {}
        return {"containerStatuses": [container_status(run.container, {"terminated": state},
                                                       container_id=run.container_id)]}
