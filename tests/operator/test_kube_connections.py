"""The operator's API client keeps its connections: every call, reads and writes alike, hands its connection
back to the pool (a burst of 100 jobs paid a TLS handshake per create while write responses were left unread)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import kubernetes
import pytest
import urllib3.connection

from kubetrain_devcluster.apiserver import serve
from kubetrain_operator.kube import Kube

NS = "default"


@pytest.fixture
def kube() -> Iterator[Kube]:
    """A Kube on the dev API server (plain HTTP, in a thread of this process)."""
    loop, ready, stop, where = asyncio.new_event_loop(), threading.Event(), threading.Event(), {}

    async def run() -> None:
        async with serve() as server:
            where["url"] = server.url
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert ready.wait(30), "the API server did not start"
    try:
        yield Kube(kubernetes.client.ApiClient(kubernetes.client.Configuration(host=where["url"])))
    finally:
        stop.set()
        thread.join(30)


def owned(kind: str, name: str, **extra) -> dict:
    return {"apiVersion": "v1", "kind": kind, "metadata": {"name": name, "namespace": NS}, **extra}


def test_writes_hand_their_connection_back(kube: Kube, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[object] = []
    connect = urllib3.connection.HTTPConnection.connect
    monkeypatch.setattr(urllib3.connection.HTTPConnection, "connect",
                        lambda self, *a, **k: (opened.append(self), connect(self, *a, **k))[1])
    job = {"metadata": {"name": "tj", "namespace": NS, "uid": "u-1"}}
    for i in range(10):
        kube.create(owned("Pod", f"p{i}", spec={"containers": [{"name": "c", "image": "i"}]}))
        kube.create(owned("Pod", f"p{i}", spec={"containers": [{"name": "c", "image": "i"}]}))  # 409: already there
        kube.create(owned("Service", f"s{i}", spec={"clusterIP": "None"}))
        kube.post_event(job, "Normal", "Test", f"event {i}", datetime.now(UTC))
        kube.list_pods(NS, "tj")
    for pod in kube.core.list_namespaced_pod(NS, _preload_content=False).json()["items"]:
        kube.delete_pod(pod)
    assert len(opened) <= 2, f"{len(opened)} connections opened for 51 sequential calls"
