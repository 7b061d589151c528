"""The checkpoint writer thread: saves land in order, and a snapshot still waiting when a newer one
arrives is dropped, so a storage outage cannot pile snapshots up in host memory."""

from __future__ import annotations

import threading

from kubetrain_trainer.checkpoint import LatestWinsWriter


def test_jobs_run_in_order_on_one_thread_and_a_waiting_one_is_replaced_by_a_newer_one():
    release = threading.Event()
    ran: list[str] = []
    threads: set[str] = set()

    def job(name: str, block: bool = False):
        def run():
            threads.add(threading.current_thread().name)
            if block:
                release.wait(10)
            ran.append(name)
            return name
        return run

    writer = LatestWinsWriter("test-writer")
    first = writer.submit(job("first", block=True))  # running: storage is slow
    while not first.running():
        pass
    second = writer.submit(job("second"))  # waits behind it...
    third = writer.submit(job("third"))  # ...and is replaced by this newer one
    assert second.cancelled() and not third.done()
    release.set()
    assert third.result(10) == "third" and first.result(10) == "first"
    assert ran == ["first", "third"] and threads == {"test-writer"}


def test_a_failing_job_reports_its_error_and_the_writer_goes_on():
    writer = LatestWinsWriter("test-writer")

    def broken():
        raise OSError("storage down")

    failed = writer.submit(broken)
    assert isinstance(failed.exception(10), OSError)
    assert writer.submit(lambda: 42).result(10) == 42
