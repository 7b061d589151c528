"""The executor's small async API client (aiohttp), from a URL or a kubeconfig."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp


class ApiError(Exception):
    def __init__(self, status: int, body: Any):
        self.status = status
        self.body = body
        message = body.get("message") if isinstance(body, dict) else str(body)[:500]
        super().__init__(f"HTTP {status}: {message}")


def load_kubeconfig(path: str | Path) -> tuple[str, str | None, ssl.SSLContext | bool | None]:
    """(server URL, bearer token, ssl) of the current context; client certificates are not supported."""
    import yaml

    config = yaml.safe_load(Path(path).read_text()) or {}
    current = config.get("current-context")
    contexts = {c["name"]: c.get("context") or {} for c in config.get("contexts") or []}
    context = contexts.get(current) or next(iter(contexts.values()), {})
    clusters = {c["name"]: c.get("cluster") or {} for c in config.get("clusters") or []}
    users = {u["name"]: u.get("user") or {} for u in config.get("users") or []}
    cluster = clusters.get(context.get("cluster")) or next(iter(clusters.values()), {})
    user = users.get(context.get("user")) or {}
    server = cluster.get("server")
    if not server:
        raise ValueError(f"{path}: no cluster server in the current context")
    ssl_option: ssl.SSLContext | bool | None = None
    if cluster.get("insecure-skip-tls-verify"):
        ssl_option = False
    elif cluster.get("certificate-authority") or cluster.get("certificate-authority-data"):
        ctx = ssl.create_default_context(cafile=cluster.get("certificate-authority"))
        if cluster.get("certificate-authority-data"):
            ctx.load_verify_locations(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
        ssl_option = ctx
    return server.rstrip("/"), user.get("token"), ssl_option


class ApiClient:
    """A thin JSON-over-HTTP client for the few Kubernetes calls the executor makes."""

    def __init__(self, server: str, token: str | None = None, ssl_option: ssl.SSLContext | bool | None = None,
                 timeout: float = 30.0):
        self.server = server.rstrip("/")
        self._headers = {"Accept": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._ssl = ssl_option
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_kubeconfig(cls, path: str | Path) -> ApiClient:
        server, token, ssl_option = load_kubeconfig(path)
        return cls(server, token, ssl_option)

    async def open(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ApiClient is not open")
        return self._session

    async def request(self, method: str, path: str, body: Any = None, params: Mapping[str, str] | None = None,
                      content_type: str = "application/json", timeout: float | None = None) -> Any:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        async with self.session.request(
            method, self.server + path, data=data, params=params, headers=headers, ssl=self._ssl,
            timeout=aiohttp.ClientTimeout(total=timeout or self._timeout),
        ) as resp:
            text = await resp.text()
            try:
                payload = json.loads(text) if text else None
            except ValueError:
                payload = text
            if resp.status >= 400:
                raise ApiError(resp.status, payload)
            return payload

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET, with None for 404."""
        try:
            return await self.request("GET", path, params=params)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def merge_patch(self, path: str, body: Any, timeout: float | None = None) -> Any:
        return await self.request("PATCH", path, body, content_type="application/merge-patch+json", timeout=timeout)

    async def strategic_patch(self, path: str, body: Any, timeout: float | None = None) -> Any:
        """Strategic merge patch (built-in kinds only): e.g. status.conditions merge by type."""
        return await self.request("PATCH", path, body, content_type="application/strategic-merge-patch+json",
                                  timeout=timeout)

    async def watch(self, path: str, params: Mapping[str, str]) -> AsyncIterator[dict[str, Any]]:
        """Watch events as dicts until the server ends the stream (lines may be longer than aiohttp's limit)."""
        async with self.session.get(
            self.server + path, params={**params, "watch": "true"}, ssl=self._ssl,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None),
        ) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, await resp.text())
            buffer = b""
            async for chunk in resp.content.iter_any():
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
            if buffer.strip():
                yield json.loads(buffer)


def is_transient(error: BaseException) -> bool:
    """Worth retrying: the server was busy or failing, or the connection broke."""
    if isinstance(error, ApiError):
        return error.status >= 500 or error.status == 429
    return isinstance(error, (aiohttp.ClientError, asyncio.TimeoutError))


def pod_path(namespace: str, name: str, sub: str = "") -> str:
    return f"/api/v1/namespaces/{namespace}/pods/{name}{sub}"
