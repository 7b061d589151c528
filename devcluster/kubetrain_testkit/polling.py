"""Waiting for a condition in end-to-end tests: poll, and fail with the system's state, not a bare timeout."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def wait_for(what: str, probe: Callable[[], Any], timeout: float, diagnostics: Callable[[], str] = lambda: "",
             interval: float = 0.3) -> Any:
    """probe() until it is truthy and return that value; after `timeout` s fail, showing diagnostics()."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{diagnostics()}")
        time.sleep(interval)
