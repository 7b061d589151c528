"""The DNS stand-in: pod DNS names in commands and env become pod IPs before the process starts."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .objects import Pod, is_deleting, is_terminal, meta, pod_key, spec, status


DnsKey = tuple[str, str, str]  # namespace, hostname, subdomain
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_CANDIDATE = re.compile(rf"(?<![\w.-]){_LABEL}(?:\.{_LABEL})+(?![\w-]|\.[a-z0-9])", re.IGNORECASE)


class DnsPending(Exception):
    """Names that will resolve once their pod exists and has an IP; the container start waits."""

    def __init__(self, names: Iterable[str]):
        self.names = sorted(set(names))
        super().__init__("waiting for DNS names: " + ", ".join(self.names))


def parse_pod_dns_name(name: str, namespace: str) -> tuple[DnsKey, bool] | None:
    """(namespace, hostname, subdomain) that a name could mean, and whether it is an explicit `.svc` name.

    `h.s` and `h.s.ns` are ambiguous (they also look like file or module names), so they are only
    replaced when such a pod exists; `h.s.ns.svc` and `h.s.ns.svc.cluster.local` are cluster names.
    """
    labels = name.lower().split(".")
    if len(labels) == 2:
        return (namespace, labels[0], labels[1]), False
    if len(labels) == 3:
        return (labels[2], labels[0], labels[1]), False
    if len(labels) == 4 and labels[3] == "svc":
        return (labels[2], labels[0], labels[1]), True
    if len(labels) == 6 and labels[3:] == ["svc", "cluster", "local"]:
        return (labels[2], labels[0], labels[1]), True
    return None


def substitute_dns(text: str, namespace: str, table: Mapping[DnsKey, str | None]) -> tuple[str, list[str]]:
    """Replace pod DNS names by pod IPs; also return the names that must wait (pod without IP, or absent `.svc` name)."""
    pending: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match.group(0)
        parsed = parse_pod_dns_name(name, namespace)
        if parsed is None:
            return name
        key, explicit = parsed
        if key in table:
            ip = table[key]
            if ip:
                return ip
            pending.append(name)
        elif explicit:
            pending.append(name)
        return name

    return _DNS_CANDIDATE.sub(replace, text), pending


def dns_table(pods: Iterable[Pod], ips: Mapping[str, str]) -> dict[DnsKey, str | None]:
    """(namespace, hostname, subdomain) -> IP (None: the pod exists but has no IP yet), from live pods.

    `ips` (uid -> IP) are the executor's own assignments, known before status reaches the cache.
    Finished and deleting pods are left out, as a headless Service drops their endpoints.
    """
    table: dict[DnsKey, str | None] = {}
    for pod in pods:
        hostname, subdomain = spec(pod).get("hostname"), spec(pod).get("subdomain")
        if not hostname or not subdomain or is_terminal(pod) or is_deleting(pod):
            continue
        key = (pod_key(pod)[0], hostname.lower(), subdomain.lower())
        ip = ips.get(meta(pod).get("uid", "")) or status(pod).get("podIP")
        table[key] = table.get(key) or ip
    return table
