"""Who may talk to the dev cluster's API server: a bearer token it knows, a loopback Host, JSON bodies.

It listens on loopback, but a browser page can still reach loopback (a "simple" text/plain POST needs no
preflight, and DNS rebinding gives a foreign name a loopback address): without these checks such a page
could create a pod whose command the executor runs. Tokens also name the caller in the audit log.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

import aiohttp.web

from .errors import api_error

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
WRITE_TYPES = frozenset({"application/json", "application/merge-patch+json", "application/json-patch+json",
                         "application/strategic-merge-patch+json"})


def new_token(user: str) -> str:
    return f"{user}.{secrets.token_urlsafe(24)}"


def write_tokens(path: Path, tokens: Mapping[str, str]) -> Path:
    """token -> user, readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(dict(tokens), f)
    return path


def read_tokens(path: Path) -> dict[str, str]:
    return {str(k): str(v) for k, v in json.loads(Path(path).read_text()).items()}


def is_loopback_host(host: str | None) -> bool:
    name = (host or "").rsplit(":", 1)[0] if not (host or "").startswith("[") else (host or "")[1:].split("]")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_access(raw: aiohttp.web.BaseRequest, tokens: Mapping[str, str] | None) -> str:
    """The caller's user name; raises a 401/403/415 Status error. `tokens` None: an open server (in-process tests)."""
    if not is_loopback_host(raw.host):
        raise api_error(403, f"Host {raw.host!r} is not a loopback address: refused (DNS rebinding)")
    declared = "Content-Type" in raw.headers  # absent: some clients send none with JSON; the body parse decides
    if raw.method in ("POST", "PUT", "PATCH") and declared and raw.content_type not in WRITE_TYPES:
        raise api_error(415, f"content type {raw.content_type!r} is not supported: send JSON")
    if tokens is None or raw.path in OPEN_PATHS:
        return raw.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    token = raw.headers.get("Authorization", "").removeprefix("Bearer ").strip()
    user = tokens.get(token)
    if user is None:
        raise api_error(401, "Unauthorized: a bearer token from the dev cluster's kubeconfig is required")
    return user


def self_signed_tls(directory: Path) -> tuple[Path, Path]:
    """A certificate and key for the loopback names (127.0.0.1, ::1, localhost), made once in `directory`.

    TLS because kubectl sends no bearer token to a plain-HTTP server: a token-protected server must be https.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = directory / "apiserver.crt", directory / "apiserver.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubetrain dev cluster")])
    now = datetime.datetime.now(datetime.UTC)
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def server_tls(cert: Path, key: Path):
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def client_tls(cert: Path):
    """What a raw client (urllib, tests) verifies the dev API server with."""
    import ssl

    return ssl.create_default_context(cafile=str(cert))
