"""Leader election over a coordination.k8s.io Lease, so that the chart can run two operator replicas.

kopf's peering cannot elect one of two identical replicas (operators of equal priority all freeze), so
the replicas elect a leader with the Kubernetes client's `leaderelection` (the Lease protocol of
client-go's leader election) and only the leader runs kopf. The standby polls the Lease and takes over
once the leader has not renewed it for LEASE_SECONDS. A leader that cannot renew within
RENEW_DEADLINE_SECONDS exits at once (as controller-runtime's managers do): it never acts after the
standby may have taken over, so two operators never reconcile at the same time. A leader that stops
cleanly deletes the Lease, so the standby takes over within RETRY_SECONDS rather than LEASE_SECONDS.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

log = logging.getLogger("kubetrain.leadership")
LEASE_SECONDS = 8  # the standby takes over at most this long (plus one retry) after the leader's last renewal
RENEW_DEADLINE_SECONDS = 6  # < LEASE_SECONDS: the old leader has exited before the standby may lead
RETRY_SECONDS = 2
LOST_LEADERSHIP_EXIT = 3


def identity() -> str:
    """Unique per process: the pod's name (the chart passes POD_NAME) or, outside a pod, host and pid."""
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


class Leadership:
    """Campaign for the Lease `namespace/name` in a daemon thread; `wait()` returns once this process leads."""

    def __init__(self, namespace: str, name: str, who: str | None = None,
                 on_lost: Callable[[], None] | None = None, api_client: client.ApiClient | None = None):
        self.namespace, self.name, self.identity = namespace, name, who or identity()
        self._api = client.CoordinationV1Api(api_client)  # default: the process's kube config
        self.leading = threading.Event()
        self._on_lost = on_lost or _exit_at_once
        self._thread = threading.Thread(target=self._campaign, name="kubetrain-leader-election", daemon=True)

    def start(self) -> Leadership:
        log.info("%s campaigns for lease %s/%s", self.identity, self.namespace, self.name)
        self._thread.start()
        return self

    def wait(self) -> None:
        self.leading.wait()

    def release(self) -> None:
        """On a clean stop: delete the Lease if this process holds it, so the standby need not wait for it to expire."""
        if not self.leading.is_set():
            return
        api = self._api
        try:
            lease = api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec and lease.spec.holder_identity == self.identity:
                api.delete_namespaced_lease(self.name, self.namespace)
                log.info("%s released lease %s/%s", self.identity, self.namespace, self.name)
        except ApiException as err:
            log.warning("could not release lease %s/%s: %s %s", self.namespace, self.name, err.status, err.reason)
        except Exception as err:  # noqa: BLE001 - best effort: the Lease then expires on its own
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, err)

    def _campaign(self) -> None:
        lock = LeaseLock(self.name, self.namespace, self.identity)
        lock.api_instance = self._api
        config = electionconfig.Config(lock, LEASE_SECONDS,
                                       RENEW_DEADLINE_SECONDS, RETRY_SECONDS, self._started, self._lost)
        while True:
            try:
                leaderelection.LeaderElection(config).run()  # returns only when a leader stops renewing
            except Exception:  # noqa: BLE001 - the library lets connection errors out of its loop
                log.warning("leader election of %s: an API call failed", self.identity, exc_info=True)
            if self.leading.is_set():
                self._lost()  # the renewals stopped, whichever way: never lead on without them
                return
            time.sleep(RETRY_SECONDS)

    def _started(self) -> None:
        log.info("%s leads (lease %s/%s)", self.identity, self.namespace, self.name)
        self.leading.set()

    def _lost(self) -> None:
        log.error("%s lost lease %s/%s: stopping, so that two operators never act at once",
                  self.identity, self.namespace, self.name)
        self._on_lost()


def _exit_at_once() -> None:
    logging.shutdown()
    os._exit(LOST_LEADERSHIP_EXIT)  # from any thread, with kopf mid-reconcile: the pod restarts as a follower
