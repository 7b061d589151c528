"""The only module that talks to the API server: read what a reconcile needs, apply a Plan.

Every write is idempotent (409 on create and 404 on delete are "already done"), so a reconcile that
is interrupted -- the operator killed mid-way -- is finished by the next one without duplicates.
"""

from __future__ import annotations

import json
import logging
import secrets
from datetime import datetime

import kubernetes
from kubernetes.client.exceptions import ApiException

from kubetrain.api import GROUP, KIND, PLURAL, VERSION, API_VERSION
from kubetrain.contracts import timestamp

from . import gang
from .builders import controlled_by, left_by_predecessor
from .names import job_selector
from .records import Observed, Plan

log = logging.getLogger("kubetrain.operator")


class ForeignObject(Exception):
    """An object of the name the job needs exists and is controlled by someone else: never adopted or replaced."""


class Predecessor(Exception):
    """An object of the name the job needs still belongs to a deleted TrainingJob of the same name: wait for
    the garbage collector rather than write into something about to be deleted."""


class Unserved(Exception):
    """The cluster does not serve a kind the job asks for (a PodGroup without its scheduler installed)."""


class Conflict(Exception):
    """The job changed between our read and our status write; reconcile again."""


class Kube:
    def __init__(self, client: kubernetes.client.ApiClient | None = None):
        self.client = client or kubernetes.client.ApiClient()
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self.networking = kubernetes.client.NetworkingV1Api(self.client)
        # PodGroups (gang.py) through an attribute of their own: tests/packaging derives the RBAC grants from
        # which attribute each call goes through
        self.pod_groups = kubernetes.client.CustomObjectsApi(self.client)

    # --- reading
    def _raw(self, response) -> dict:
        body = json.loads(response.data)
        response.release_conn()
        return body

    @staticmethod
    def _drained(response) -> None:
        """Read and give back the connection of a response we do not need: an unread one keeps its
        connection out of the pool, and the next call pays a new TLS handshake (a burst of jobs did)."""
        response.data  # noqa: B018 - reading is the point
        response.release_conn()

    def get_job(self, namespace: str, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def list_pods(self, namespace: str, job: str) -> list[dict]:
        resp = self.core.list_namespaced_pod(namespace, label_selector=job_selector(job), _preload_content=False)
        return self._raw(resp).get("items") or []

    def read_service(self, namespace: str, name: str) -> dict | None:
        try:
            return self._raw(self.core.read_namespaced_service(name, namespace, _preload_content=False))
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def observe(self, job: dict, now: datetime) -> Observed:
        meta = job["metadata"]
        service = self.read_service(meta["namespace"], meta["name"])
        return observed_of(job, self.list_pods(meta["namespace"], meta["name"]), service, now)

    # --- writing
    def apply(self, job: dict, plan: Plan, now: datetime) -> list[dict]:
        """Status first (so a decision is durable before its side effects), then objects, then events. Returns
        the API server's answers for the job's status, and for the pods and Service created (for the watch cache)."""
        meta = job["metadata"]
        ns, name = meta["namespace"], meta["name"]
        written = []
        if plan.status is not None:
            written.append(self.patch_status(ns, name, meta.get("resourceVersion"), plan.status))
        if plan.replace_config is not None:
            self.put_config_map(plan.replace_config)
        if plan.suspend_job:
            self.suspend_job(ns, name)
        for manifest in plan.create:
            if (created := self.create(manifest)) is not None:
                written.append(created)
        for pod in plan.delete_pods:
            self.delete_pod(pod)
        for ref in plan.delete_pod_groups:
            self.delete_pod_group(ref)
        for event in plan.events:
            self.post_event(job, event.type, event.reason, event.message, now)
        if plan.delete_job:
            self.delete_job(ns, name)
        return written

    def patch_status(self, namespace: str, name: str, resource_version: str | None, status: dict) -> dict:
        """The job as it is after the write."""
        body = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}  # optimistic concurrency
        try:
            return self._raw(self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name,
                                                                              body, _preload_content=False))
        except ApiException as err:
            if err.status == 409:
                raise Conflict(f"{namespace}/{name} changed since it was read") from None
            raise

    def suspend_job(self, namespace: str, name: str) -> None:
        body = {"spec": {"runPolicy": {"suspend": True}}}
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body)
        log.info("suspended TrainingJob %s/%s (runPolicy.schedulingTimeoutPolicy: Suspend)", namespace, name)

    def create(self, manifest: dict) -> dict | None:
        """Create-only. A Secret that exists must be this job's (its rendezvous id); other kinds are left as they are.
        Returns a created pod or Service as the API server answered (None for other kinds, or one that existed)."""
        ns, kind, name = manifest["metadata"]["namespace"], manifest["kind"], manifest["metadata"]["name"]
        if kind == "PodGroup":
            return self._create_pod_group(manifest)
        create = {"Pod": self.core.create_namespaced_pod, "Service": self.core.create_namespaced_service,
                  "ConfigMap": self.core.create_namespaced_config_map, "Secret": self.core.create_namespaced_secret,
                  "NetworkPolicy": self.networking.create_namespaced_network_policy}[kind]
        try:
            response = create(ns, manifest, _preload_content=False)
        except ApiException as err:
            if err.status != 409:
                raise
            if kind == "Secret":
                self._check_owned(kind, self._raw(self.core.read_namespaced_secret(name, ns, _preload_content=False)),
                                  manifest)
            return None
        log.info("created %s %s/%s", kind, ns, name)
        if kind in ("Pod", "Service"):
            return self._raw(response)
        self._drained(response)
        return None

    def _create_pod_group(self, manifest: dict) -> None:
        meta, api_version = manifest["metadata"], manifest["apiVersion"]
        group, version = api_version.split("/")
        try:
            self._drained(self.pod_groups.create_namespaced_custom_object(group, version, meta["namespace"], gang.PLURAL,
                                                                      manifest, _preload_content=False))
            log.info("created PodGroup %s/%s (%s)", meta["namespace"], meta["name"], api_version)
        except ApiException as err:
            if err.status == 404:  # the kind is not served: no scheduler of that kind is installed
                raise Unserved(f"runPolicy.podGroupPolicy: this cluster does not serve {api_version} PodGroup "
                               f"(install {gang.KINDS[api_version].scheduler}'s PodGroup CRD, or unset "
                               "podGroupPolicy)") from None
            if err.status != 409:
                raise

    def delete_pod_group(self, ref: dict) -> None:
        meta = ref["metadata"]
        group, version = ref["apiVersion"].split("/")
        try:
            self._drained(self.pod_groups.delete_namespaced_custom_object(group, version, meta["namespace"], gang.PLURAL,
                                                                      meta["name"], _preload_content=False))
            log.info("deleted PodGroup %s/%s (its attempt is over)", meta["namespace"], meta["name"])
        except ApiException as err:
            if err.status != 404:
                raise

    def _check_owned(self, kind: str, current: dict, manifest: dict) -> None:
        """Raise unless `current` (of the name `manifest` wants) is controlled by the manifest's owner."""
        meta, owner = manifest["metadata"], manifest["metadata"]["ownerReferences"][0]
        if controlled_by(current, owner["uid"]):
            return
        if left_by_predecessor(current, owner["name"]):
            raise Predecessor(f"{kind} {meta['namespace']}/{meta['name']} still belongs to a deleted TrainingJob of this name")
        raise ForeignObject(foreign_message(kind, meta["namespace"], meta["name"]))

    def put_config_map(self, manifest: dict) -> None:
        """Create the job's ConfigMap; one that exists is replaced only if this job controls it."""
        meta = manifest["metadata"]
        ns, name = meta["namespace"], meta["name"]
        try:
            self._drained(self.core.create_namespaced_config_map(ns, manifest, _preload_content=False))
            log.info("created ConfigMap %s/%s", ns, name)
            return
        except ApiException as err:
            if err.status != 409:
                raise
        current = self._raw(self.core.read_namespaced_config_map(name, ns, _preload_content=False))
        self._check_owned("ConfigMap", current, manifest)
        body = {**manifest, "metadata": {**meta, "resourceVersion": current["metadata"]["resourceVersion"]}}
        try:
            self._drained(self.core.replace_namespaced_config_map(name, ns, body, _preload_content=False))
        except ApiException as err:
            if err.status == 409:  # changed since it was read: the reconcile starts over
                raise Conflict(f"ConfigMap {ns}/{name} changed since it was read") from None
            raise

    def delete_pod(self, pod: dict) -> None:
        meta = pod["metadata"]
        body = kubernetes.client.V1DeleteOptions(preconditions=kubernetes.client.V1Preconditions(uid=meta["uid"]))
        try:
            self._drained(self.core.delete_namespaced_pod(meta["name"], meta["namespace"], body=body, _preload_content=False))
            log.info("deleting pod %s/%s", meta["namespace"], meta["name"])
        except ApiException as err:
            if err.status not in (404, 409):  # gone already, or a newer pod of that name
                raise

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            log.info("deleted TrainingJob %s/%s (ttlSecondsAfterFinished)", namespace, name)
        except ApiException as err:
            if err.status != 404:
                raise

    def post_event(self, job: dict, type_: str, reason: str, message: str, now: datetime) -> None:
        meta = job["metadata"]
        when = timestamp(now)
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "kubetrain-operator"},
            "reportingComponent": "kubetrain-operator",
            "firstTimestamp": when,
            "lastTimestamp": when,
            "count": 1,
        }
        try:
            self._drained(self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False))
        except ApiException as err:  # an event is worth a log line, never a failed reconcile
            log.warning("could not post event %s for %s/%s: %s", reason, meta["namespace"], meta["name"], err.status)


def observed_of(job: dict, pods: list[dict], service: dict | None, now: datetime) -> Observed:
    """What a reconcile sees, from the job, the pods labelled with its name and the Service of its name (read
    fresh, or from the watch cache)."""
    meta = job["metadata"]
    ns, name, uid = meta["namespace"], meta["name"], meta.get("uid", "")
    foreign = None
    if service is not None and not controlled_by(service, uid):
        if left_by_predecessor(service, name):
            service = None  # being garbage-collected: created again once it is gone
        else:
            foreign = foreign_message("Service", ns, name)
    mine = [p for p in pods if controlled_by(p, uid)]  # status belongs to this object, never to a predecessor
    earlier = sum(1 for p in pods if not controlled_by(p, uid) and left_by_predecessor(p, name))
    return Observed(job=job, pods=mine, has_service=service is not None, now=now, foreign=foreign,
                    token=secrets.token_hex(16), predecessor_pods=earlier)


def foreign_message(kind: str, namespace: str, name: str) -> str:
    return (f"{kind} {namespace}/{name} already exists and is not controlled by this TrainingJob: it is neither adopted "
            f"nor replaced; delete or rename it, or give the job another name")
