"""The operator's recheck thread: each known job again after what its plan asked; a gone job drops out."""

from __future__ import annotations

import threading
import time

from kubetrain_operator.rechecks import Rechecks


def test_jobs_are_rechecked_when_due_and_a_gone_job_drops_out():
    seen: list[tuple[str, str]] = []
    done = threading.Event()

    def reconcile(ns: str, name: str) -> float | None:
        seen.append((ns, name))
        if seen.count(("ml", "gone")) == 1 and seen.count(("ml", "live")) >= 3:
            done.set()
        return None if name == "gone" else 0.05

    rechecks = Rechecks(reconcile, interval=lambda jobs: 60).start()
    try:
        rechecks.track(("ml", "live"), after=0)
        rechecks.track(("ml", "gone"), after=0)
        rechecks.track(("ml", "never"))  # not due for a minute
        assert done.wait(10), seen
        time.sleep(0.6)
        assert seen.count(("ml", "gone")) == 1 and ("ml", "never") not in seen
        assert rechecks.known() >= {("ml", "live")} and ("ml", "gone") not in rechecks.known()
        rechecks.forget(("ml", "live"))
        time.sleep(0.6)
        count = seen.count(("ml", "live"))
        time.sleep(0.6)
        assert seen.count(("ml", "live")) == count  # forgotten: no more rechecks (one may have been in flight)
    finally:
        rechecks.stop()
