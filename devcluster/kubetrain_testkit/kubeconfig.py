"""Raw HTTP to the dev API server as a kubeconfig's user: its bearer token and the certificate it trusts."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import yaml


def credentials(kubeconfig: Path) -> tuple[dict[str, str], ssl.SSLContext | None]:
    """(Authorization header, SSL context or None for http) of a kubeconfig's only cluster and user."""
    config = yaml.safe_load(Path(kubeconfig).read_text())
    (cluster,), (user,) = config["clusters"], config["users"]
    ca = cluster["cluster"].get("certificate-authority-data")
    context = ssl.create_default_context(cadata=base64.b64decode(ca).decode()) if ca else None
    return {"Authorization": f"Bearer {user['user']['token']}"}, context
