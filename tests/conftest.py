"""Shared fixtures of every layer (unit, trainer, devcluster, operator, faults, packaging)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kubetrain_devcluster.cluster import DevCluster
from kubetrain_devcluster.s3 import S3Server
from kubetrain_testkit.clusterkit import make_corpus


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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request) -> Iterator[DevCluster]:
    """A 2-node dev cluster (API server, executor, operator, moto S3) for one test module."""
    with DevCluster(tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2]), nodes=2) as c:
        yield c


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """The tiny sentiment corpus and tokenizer that the cluster tests' jobs train on."""
    return make_corpus(tmp_path_factory.mktemp("corpus"))
