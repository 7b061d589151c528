"""Pod IPs: unique loopback aliases 127.A.B.C (never 127.0.0.x)."""

from __future__ import annotations

import random


class IpAllocator:
    """Unique loopback addresses 127.A.B.C for pods (127.0.0.x is the host's).

    Each executor starts at a random 127.A.1.1 (A in 1..254), so that two dev clusters on one machine
    (a test run and a user's) do not hand out the same pod IPs.
    """

    FIRST = (127 << 24) | (1 << 16) | 1
    LAST = (127 << 24) | 0xFFFFFE

    def __init__(self, start: int | None = None) -> None:
        self._next = start if start is not None else (127 << 24) | (random.randint(1, 254) << 16) | (1 << 8) | 1
        self._used: set[str] = set()

    def allocate(self) -> str:
        for _ in range(self.LAST - self.FIRST + 1):
            value = self._next
            self._next = self.FIRST if value >= self.LAST else value + 1
            if value & 0xFF in (0, 255):
                continue
            ip = ".".join(str((value >> s) & 0xFF) for s in (24, 16, 8, 0))
            if ip not in self._used:
                self._used.add(ip)
                return ip
        raise RuntimeError("no free pod IP in 127/8")

    def release(self, ip: str | None) -> None:
        self._used.discard(ip or "")
