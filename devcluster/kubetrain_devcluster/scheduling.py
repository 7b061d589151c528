"""Scheduling: pods bound round-robin to the nodes whose labels match nodeSelector and required node affinity."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp

from .apiclient import ApiError, pod_path
from .objects import Pod, is_deleting, is_terminal, meta, now_rfc3339, pod_key, spec, status
from .podstatus import condition, stamp_conditions

log = logging.getLogger("kubetrain_devcluster.executor")


def match_expression(expr: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """One NodeSelectorRequirement (In, NotIn, Exists, DoesNotExist, Gt, Lt) against node labels."""
    key, op, values = expr.get("key", ""), expr.get("operator", ""), list(expr.get("values") or [])
    present = key in labels
    if op == "In":
        return present and labels[key] in values
    if op == "NotIn":
        return not present or labels[key] not in values
    if op == "Exists":
        return present
    if op == "DoesNotExist":
        return not present
    if op in ("Gt", "Lt") and present and len(values) == 1:
        try:
            have, want = int(labels[key]), int(values[0])
        except ValueError:
            return False
        return have > want if op == "Gt" else have < want
    return False


def node_selector_term_matches(term: Mapping[str, Any], node_name: str, labels: Mapping[str, str]) -> bool:
    """A NodeSelectorTerm: all matchExpressions (labels) and matchFields (metadata.name) must hold."""
    fields = {"metadata.name": node_name}
    return (all(match_expression(e, labels) for e in term.get("matchExpressions") or [])
            and all(match_expression(e, fields) for e in term.get("matchFields") or []))


def pod_fits_node(pod_spec: Mapping[str, Any], node_name: str, labels: Mapping[str, str]) -> bool:
    """nodeSelector (every key equal) and required node affinity (any term) both hold for the node."""
    selector = pod_spec.get("nodeSelector") or {}
    if any(labels.get(k) != v for k, v in selector.items()):
        return False
    required = (((pod_spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = required.get("nodeSelectorTerms")
    if terms:
        return any(node_selector_term_matches(t, node_name, labels) for t in terms)
    return True


class SchedulerMixin:
    """The executor's scheduler: binds pending pods to its live nodes, or marks them Unschedulable."""


    async def _schedule_loop(self) -> None:
        while True:
            self._schedule_wake.clear()
            try:
                await self._schedule_pending()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.exception("scheduling failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._schedule_wake.wait(), self.options.schedule_interval)

    async def _schedule_pending(self) -> None:
        for uid, pod in list(self._pods.items()):
            if self._pods.get(uid) is not pod or not self._wants_scheduling(pod):
                continue
            if spec(pod).get("schedulingGates"):  # kube-scheduler leaves a gated pod alone until its gates are gone
                await self._mark_unscheduled(pod, "SchedulingGated", "Scheduling is blocked due to non-empty scheduling gates")
                continue
            node = self._pick_node(pod)
            if node is None:
                await self._mark_unschedulable(pod)
            else:
                await self._bind(pod, node)

    @staticmethod
    def _wants_scheduling(pod: Pod) -> bool:
        return (not spec(pod).get("nodeName") and not is_deleting(pod) and not is_terminal(pod)
                and spec(pod).get("schedulerName", "default-scheduler") in (None, "default-scheduler"))

    def _pick_node(self, pod: Pod) -> str | None:
        """Round-robin over our live, schedulable nodes that fit the pod."""
        fitting = [name for name in self.node_names if name in self._nodes
                   and not spec(self._nodes[name]).get("unschedulable")
                   and pod_fits_node(spec(pod), name, meta(self._nodes[name]).get("labels") or {})]
        if not fitting:
            return None
        return fitting[next(self._rr) % len(fitting)]

    async def _bind(self, pod: Pod, node: str) -> None:
        """PATCH spec.nodeName, then status Pending + PodScheduled; the pod is reconciled only after both."""
        namespace, name = pod_key(pod)
        uid = meta(pod).get("uid", "")
        self._binding.add(uid)
        try:
            try:
                bound = await self.api.merge_patch(pod_path(namespace, name), {"spec": {"nodeName": node}})
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                if not (isinstance(e, ApiError) and e.status in (404, 409)):
                    log.warning("binding pod %s/%s failed (%s); the next round retries", namespace, name, e)
                return
            log.info("pod %s/%s bound to %s", namespace, name, node)
            conditions = stamp_conditions(status(pod).get("conditions") or [], [condition("PodScheduled", True)], now_rfc3339())
            try:
                await self._patch_pod_status(namespace, name, uid, {"phase": "Pending", "conditions": conditions})
            except (ApiError, aiohttp.ClientError, asyncio.TimeoutError) as e:
                log.warning("pod %s/%s: status write failed: %s", namespace, name, e)
        finally:
            self._binding.discard(uid)
        if uid in self._pods:  # always, once bound: its watch events were ignored while binding
            latest = self._pods[uid]
            if not spec(latest).get("nodeName"):
                latest = bound
                self._pods[uid] = bound
            self._reconcile(latest)

    async def _mark_unschedulable(self, pod: Pod) -> None:
        total = len(self.node_names) - len(self._lost)
        message = (f"0/{total} nodes are available: {total} node(s) didn't match Pod's node affinity/selector."
                   if total else "0/0 nodes are available: every node of the executor was lost.")
        await self._mark_unscheduled(pod, "Unschedulable", message)

    async def _mark_unscheduled(self, pod: Pod, reason: str, message: str) -> None:
        """PodScheduled=False with the scheduler's reason, written only when it changes."""
        current = {c.get("type"): c for c in status(pod).get("conditions") or []}.get("PodScheduled") or {}
        if current.get("reason") == reason and current.get("message") == message:
            return
        conditions = stamp_conditions(status(pod).get("conditions") or [],
                                      [condition("PodScheduled", False, reason, message)], now_rfc3339())
        namespace, name = pod_key(pod)
        with contextlib.suppress(ApiError):
            # no phase: with several executors on one server, another one may have bound it meanwhile
            await self._patch_pod_status(namespace, name, meta(pod).get("uid", ""), {"conditions": conditions})
