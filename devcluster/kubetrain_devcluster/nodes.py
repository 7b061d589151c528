"""The executor's simulated nodes: registration, readiness, and the loss of a node (its pods die)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

import aiohttp

from .apiclient import ApiError
from .machine import machine_arch, node_system_info
from .objects import HOST_IP, meta, now_rfc3339, spec

from .podstatus import condition

log = logging.getLogger("kubetrain_devcluster.executor")


class NodesMixin:
    """Node objects of this executor (``self.node_names``), kept in ``self._nodes``; lost ones in ``self._lost``."""


    def _node_manifest(self, name: str) -> dict[str, Any]:
        labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": machine_arch(),
                  **self.options.node_labels}
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
                "spec": {}, "status": self._node_status(True)}

    def _node_status(self, ready: bool) -> dict[str, Any]:
        now = now_rfc3339()
        capacity = {"cpu": str(os.cpu_count() or 1), "memory": f"{self._memory // 1024}Ki", "pods": "110"}
        reason, message = ("KubeletReady", "kubetrain executor is running") if ready else \
            ("KubeletNotReady", "kubetrain executor stopped")
        return {"capacity": capacity, "allocatable": capacity,
                "conditions": [{**condition("Ready", ready, reason, message),
                                "lastHeartbeatTime": now, "lastTransitionTime": now}],
                "addresses": [{"type": "InternalIP", "address": HOST_IP}],
                "nodeInfo": node_system_info()}

    async def _register_nodes(self, patience: float = 30.0) -> None:
        """Register every node; retried while the API server is not answering yet."""
        deadline = time.monotonic() + patience
        for name in self.node_names:
            while True:
                try:
                    await self._register_node(name)
                    break
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    if time.monotonic() > deadline:
                        raise
                    log.info("registering node %s failed (%s); retrying", name, e)
                    await asyncio.sleep(self.options.watch_retry_interval)

    async def _register_node(self, name: str) -> None:
        """Create the Node; take over an existing one of the same name (a previous executor's)."""
        manifest = self._node_manifest(name)
        try:
            await self.api.request("POST", "/api/v1/nodes", manifest)
        except ApiError as e:
            if e.status != 409:
                raise
            await self.api.merge_patch(f"/api/v1/nodes/{name}", {"metadata": {"labels": manifest["metadata"]["labels"]},
                                                                 "spec": {"unschedulable": None}})
        # status through its subresource even after a create: servers may drop status on create
        node = await self.api.merge_patch(f"/api/v1/nodes/{name}/status", {"status": manifest["status"]})
        self._nodes[name] = node or manifest

    async def _mark_node_not_ready(self, name: str) -> None:
        with contextlib.suppress(Exception):
            await self.api.merge_patch(f"/api/v1/nodes/{name}/status", {"status": self._node_status(False)}, timeout=2)

    async def _on_node_list(self, items: list[dict[str, Any]]) -> None:
        names = {meta(n).get("name") for n in items}
        for name in list(self._nodes):
            if name not in names:
                self._node_lost(name)
        for node in items:
            await self._on_node_event("ADDED", node)

    async def _on_node_event(self, kind: str, node: dict[str, Any]) -> None:
        name = meta(node).get("name", "")
        if name not in self.node_names or name in self._lost:
            return
        if kind == "DELETED":
            self._node_lost(name)
        else:
            self._nodes[name] = node
            self._schedule_wake.set()

    def _node_lost(self, name: str) -> None:
        """Simulate losing the machine: kill its pods now, mark them NodeLost, remove them."""
        if name in self._lost:
            return
        log.warning("node %s was deleted: its pods are lost", name)
        self._lost.add(name)
        self._nodes.pop(name, None)
        for run in self._runs.values():
            if run.node == name and run.active:
                run.node_lost = True
                run.request_stop(0)
        for uid, pod in list(self._pods.items()):
            if uid not in self._runs and spec(pod).get("nodeName") == name:
                self._reconcile(pod)
