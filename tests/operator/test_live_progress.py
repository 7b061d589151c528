"""The operator's scrape of a trainer's /metrics is bounded: a trickling or huge answer gives up by the deadline
and the body cap, and a real trainer exporter is read. Real sockets on loopback; the hostile servers are ours."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest

from kubetrain.ports import free_port
from kubetrain_operator import live_progress
from kubetrain_trainer.metrics import TrainerMetrics


@pytest.fixture
def hostile_server() -> Iterator[Callable[[Callable[[socket.socket], None]], int]]:
    """Start a loopback server whose connections `behave(conn)` handles; yields a starter returning the port."""
    stop, threads, listeners = threading.Event(), [], []
    lock, active, peak = threading.Lock(), [0], [0]

    def start(behave: Callable[[socket.socket], None]) -> int:
        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.2)
        listeners.append(listener)

        def serve():
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=handle, args=(conn,), daemon=True).start()

        def handle(conn: socket.socket) -> None:
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            try:
                with conn:
                    behave(conn)
            except OSError:
                pass
            finally:
                with lock:
                    active[0] -= 1

        threads.append(threading.Thread(target=serve, daemon=True))
        threads[-1].start()
        return listener.getsockname()[1]

    start.peak = peak  # the most connections open at once
    yield start
    stop.set()
    for t in threads:
        t.join(5)
    for listener in listeners:
        listener.close()


def trickle(conn: socket.socket, head: bool) -> None:
    """One byte every 0.2 s for up to 60 s: of the status line and headers, or of the body."""
    if not head:
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
    for _ in range(300):
        conn.sendall(b"X-Slow: y\r\n"[:1] if head else b"#")
        time.sleep(0.2)


@pytest.mark.parametrize("head", [True, False], ids=["trickled-headers", "trickled-body"])
def test_a_trickling_trainer_cannot_hold_the_scrape_past_its_deadline(hostile_server, head):
    port = hostile_server(lambda conn: trickle(conn, head))
    started = time.monotonic()
    assert live_progress.scrape(["127.0.0.1"], port, "s3://b/p", deadline_s=1.0) is None
    assert time.monotonic() - started < 5, "bounded by the 1 s deadline (the server trickles for 60 s)"


def test_a_huge_answer_is_dropped_at_the_body_cap(hostile_server):
    sent = []

    def flood(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nkubetrain_train_step 7\n")
        for _ in range(300):  # 300 x 1 MiB, if the client kept reading
            conn.sendall(b"#" * (1 << 20))
            sent.append(1)

    port = hostile_server(flood)
    assert live_progress.scrape(["127.0.0.1"], port, "s3://b/p", deadline_s=30) is None
    assert len(sent) < 50, "the client stopped reading near the 1 MiB cap"


def test_a_real_exporter_is_read_and_a_dead_pod_skipped():
    metrics = TrainerMetrics()
    port = free_port()
    metrics.serve(port, "127.0.0.2")
    metrics.step.set(12)
    metrics.last_checkpoint_step.set(10)
    metrics.last_checkpoint_timestamp.set(1_796_126_287)
    found = live_progress.scrape(["127.0.0.3", "127.0.0.2"], port, "s3://b/ns/job")  # nobody on .3
    assert found.step == 12 and found.checkpoint.uri == "s3://b/ns/job/step-000000010"
    assert found.checkpoint.time == datetime.fromtimestamp(1_796_126_287, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_few_scrapes_wait_at_once_and_the_rest_skip(hostile_server):
    port = hostile_server(lambda conn: trickle(conn, head=False))
    results: list = []
    workers = [threading.Thread(target=lambda: results.append(live_progress.scrape(["127.0.0.1"], port, "p", deadline_s=2)))
               for _ in range(live_progress.CONCURRENT_SCRAPES + 3)]
    started = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join(10)
    assert results == [None] * len(workers) and time.monotonic() - started < 6
    assert hostile_server.peak[0] <= live_progress.CONCURRENT_SCRAPES, "the others skipped instead of connecting"
