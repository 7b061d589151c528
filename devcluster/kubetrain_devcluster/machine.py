"""Facts of this machine for the simulated nodes: arch, OS info, memory, resource quantities."""

from __future__ import annotations

import os
import platform
import re
from decimal import Decimal
from pathlib import Path


_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?")
_SUFFIXES: dict[str, Decimal] = {
    "": Decimal(1), "m": Decimal("0.001"), "k": Decimal(10) ** 3, "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9, "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30, "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60,
}


def parse_quantity(value: str | int | float) -> Decimal:
    """A Kubernetes resource quantity ("500m", "2Gi", "1e3") as an exact number."""
    match = _QUANTITY.fullmatch(str(value).strip())
    if match is None:
        raise ValueError(f"invalid quantity {value!r}")
    return Decimal(match.group(1)) * _SUFFIXES[match.group(2) or ""]


def machine_arch() -> str:
    """This machine's architecture as Kubernetes spells it (amd64, arm64, ...)."""
    machine = platform.machine().lower()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine or "amd64")


def node_system_info() -> dict[str, str]:
    """Node status.nodeInfo; every field is filled, as typed clients require them all."""
    def read(path: str, default: str) -> str:
        try:
            return Path(path).read_text().strip() or default
        except OSError:
            return default

    machine_id = read("/etc/machine-id", "0" * 32)
    return {"architecture": machine_arch(), "operatingSystem": "linux", "osImage": platform.platform(),
            "kernelVersion": platform.release(), "bootID": read("/proc/sys/kernel/random/boot_id", ""),
            "machineID": machine_id, "systemUUID": machine_id, "kubeletVersion": "v1.30.0-kubetrain",
            "kubeProxyVersion": "", "containerRuntimeVersion": "local://1"}


def machine_memory_bytes() -> int:
    """Total memory of this machine (node capacity)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
