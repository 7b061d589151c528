"""Shared fixtures of every layer (unit, trainer, devcluster, operator, faults, packaging)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from kubetrain_devcluster.s3 import S3Server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One real moto S3 server (HTTP, subprocess) for the whole test session."""
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket; os.environ points boto3 at the server, so `open_storage("s3://...")` works."""
    name = f"kt-{uuid.uuid4().hex[:16]}"
    s3_server.create_bucket(name)
    for var in ("AWS_PROFILE", "AWS_REGION", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return name
