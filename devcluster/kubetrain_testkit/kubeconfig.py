"""Raw HTTP to the dev API server as a kubeconfig's user: its bearer token and the certificate it trusts."""

from __future__ import annotations

import ssl
from pathlib import Path

from kubetrain_devcluster.apiclient import load_kubeconfig


def credentials(kubeconfig: Path) -> tuple[dict[str, str], ssl.SSLContext | None]:
    """(Authorization header, SSL context or None for http), read the way the pod executor reads it."""
    _, token, tls = load_kubeconfig(kubeconfig)
    return {"Authorization": f"Bearer {token}"}, tls if isinstance(tls, ssl.SSLContext) else None
