"""Storage over a local directory and over a real (moto, HTTP) S3 server."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from kubetrain_trainer.failures import StorageError, describe
from kubetrain_trainer.storage import (
    LocalStorage,
    NotFound,
    S3Storage,
    Storage,
    open_storage,
    read_uri_bytes,
)

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    store, prefix = open_storage(f"s3://{bucket}")
    assert prefix == ""
    return store


def test_bytes_round_trip(storage: Storage) -> None:
    storage.put_bytes(b"hello", "a/b/c.txt")
    assert storage.get_bytes("a/b/c.txt") == b"hello"
    storage.put_bytes(b"replaced", "a/b/c.txt")
    assert storage.get_bytes("a/b/c.txt") == b"replaced"


def test_file_round_trip(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(100_000))
    storage.put_file(src, "dir/file.bin")
    dest = tmp_path / "out" / "deep" / "file.bin"
    storage.get_file("dir/file.bin", dest)
    assert dest.read_bytes() == src.read_bytes()


def test_missing_key_is_not_found(storage: Storage, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        storage.get_bytes("nope")
    with pytest.raises(NotFound):
        storage.get_file("nope/x", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_list_keys_recursive_sorted(storage: Storage) -> None:
    for key in ["p/z", "p/a/2", "p/a/1", "p/b/c/d", "pq/x", "other"]:
        storage.put_bytes(key.encode(), key)
    assert storage.list_keys("p/") == ["p/a/1", "p/a/2", "p/b/c/d", "p/z"]
    assert storage.list_keys("p") == ["p/a/1", "p/a/2", "p/b/c/d", "p/z", "pq/x"]
    assert storage.list_keys("p/a/") == ["p/a/1", "p/a/2"]
    assert storage.list_keys("") == ["other", "p/a/1", "p/a/2", "p/b/c/d", "p/z", "pq/x"]
    assert storage.list_keys("missing/") == []


def test_delete_keys(storage: Storage) -> None:
    for key in ["d/1", "d/2", "d/sub/3", "keep"]:
        storage.put_bytes(b"x", key)
    storage.delete_keys(["d/1", "d/sub/3", "d/never-existed"])
    assert storage.list_keys("") == ["d/2", "keep"]
    storage.delete_keys([])
    storage.delete_keys(["d/2"])
    assert storage.list_keys("") == ["keep"]


def test_uri(storage: Storage, tmp_path: Path) -> None:
    if isinstance(storage, S3Storage):
        assert storage.uri("a/b") == f"s3://{storage.bucket}/a/b"
    else:
        assert storage.uri("a/b") == str(tmp_path / "store" / "a" / "b")


def test_local_writes_are_atomic_and_leave_no_temp_files(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    store.put_bytes(b"1", "x/y")
    store.put_file(tmp_path / "x" / "y", "x/z")
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["y", "z"]


def test_local_delete_prunes_empty_dirs(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "root")
    store.put_bytes(b"1", "a/b/c")
    store.delete_keys(["a/b/c"])
    assert (tmp_path / "root").is_dir()
    assert not (tmp_path / "root" / "a").exists()


def test_local_rejects_escaping_keys(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "root")
    for bad in ["../x", "/etc/passwd", "a/../../x", ""]:
        with pytest.raises(ValueError):
            store.put_bytes(b"x", bad)


def test_s3_multipart_upload_and_download(s3_bucket: str, s3_server, tmp_path: Path) -> None:
    store, _ = open_storage(f"s3://{s3_bucket}", multipart_threshold=5 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(11 * MiB))
    store.put_file(src, "big/object.bin")

    head = s3_server.client().head_object(Bucket=s3_bucket, Key="big/object.bin")
    assert head["ContentLength"] == 11 * MiB
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # 5 + 5 + 1 MiB parts

    dest = tmp_path / "back.bin"
    store.get_file("big/object.bin", dest)
    assert dest.read_bytes() == src.read_bytes()


def test_s3_small_file_is_single_part(s3_bucket: str, s3_server, tmp_path: Path) -> None:
    store, _ = open_storage(f"s3://{s3_bucket}", multipart_threshold=5 * MiB)
    src = tmp_path / "small.bin"
    src.write_bytes(b"x" * 1000)
    store.put_file(src, "small.bin")
    etag = s3_server.client().head_object(Bucket=s3_bucket, Key="small.bin")["ETag"]
    assert "-" not in etag


def test_s3_delete_keys_batches_over_1000(s3_bucket: str) -> None:
    store, _ = open_storage(f"s3://{s3_bucket}")
    calls = []
    real = store.client.delete_objects

    def spy(**kwargs):
        calls.append(len(kwargs["Delete"]["Objects"]))
        return real(**kwargs)

    store.client.delete_objects = spy  # type: ignore[method-assign]
    keys = [f"k/{i:05d}" for i in range(1005)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.put_bytes(b"", k), keys))
    assert store.list_keys("k/") == keys  # more than one page (1000 keys per page)
    store.delete_keys(keys)
    assert calls == [1000, 5]
    assert store.list_keys("k/") == []


def test_open_storage_parses_uris(s3_bucket: str, tmp_path: Path) -> None:
    store, prefix = open_storage(f"s3://{s3_bucket}/some/prefix/")
    assert isinstance(store, S3Storage)
    assert (store.bucket, prefix) == (s3_bucket, "some/prefix")

    store, prefix = open_storage(f"file://{tmp_path}/ckpt")
    assert isinstance(store, LocalStorage)
    assert (store.root, prefix) == (tmp_path / "ckpt", "")

    store, prefix = open_storage(str(tmp_path / "plain"))
    assert isinstance(store, LocalStorage)
    assert (store.root, prefix) == (tmp_path / "plain", "")

    for bad in ["s3://", "s3:///key", "gs://bucket/x", ""]:
        with pytest.raises(ValueError):
            open_storage(bad)


def test_open_storage_explicit_endpoint(s3_server, s3_bucket: str, monkeypatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    store, _ = open_storage(f"s3://{s3_bucket}", endpoint=s3_server.endpoint, region="eu-west-1")
    store.put_bytes(b"x", "k")
    assert s3_server.client().get_object(Bucket=s3_bucket, Key="k")["Body"].read() == b"x"


def test_read_uri_bytes(s3_bucket: str, s3_server, tmp_path: Path) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="data/train.jsonl", Body=b'{"t": 1}\n')
    assert read_uri_bytes(f"s3://{s3_bucket}/data/train.jsonl") == b'{"t": 1}\n'
    local = tmp_path / "d.txt"
    local.write_bytes(b"local")
    assert read_uri_bytes(str(local)) == b"local"
    assert read_uri_bytes(f"file://{local}") == b"local"
    with pytest.raises(ValueError):
        read_uri_bytes(f"s3://{s3_bucket}")
    with pytest.raises(NotFound):
        read_uri_bytes(f"s3://{s3_bucket}/data/missing.jsonl")


@pytest.mark.parametrize("op", ["get_bytes", "list_keys", "put_bytes", "put_file", "get_file"])
def test_a_missing_bucket_is_a_permanent_error_naming_it(s3_bucket: str, tmp_path: Path, op: str) -> None:
    """Real moto S3: every request on a bucket that does not exist fails once, naming the bucket, and is not retried."""
    storage, _ = open_storage(f"s3://{s3_bucket}-gone/runs")
    local = tmp_path / "f"
    local.write_bytes(b"x")
    call = {"get_bytes": lambda: storage.get_bytes("k"), "list_keys": lambda: storage.list_keys("runs/"),
            "put_bytes": lambda: storage.put_bytes(b"x", "k"), "put_file": lambda: storage.put_file(local, "k"),
            "get_file": lambda: storage.get_file("k", tmp_path / "g")}[op]
    with pytest.raises(StorageError) as err:
        call()
    assert f"bucket '{s3_bucket}-gone' does not exist (s3://{s3_bucket}-gone/" in str(err.value)
    assert describe(err.value).permanent


def test_read_rows_of_a_missing_bucket_says_so_in_one_line(s3_bucket: str) -> None:
    from kubetrain_trainer.data import read_rows

    with pytest.raises(StorageError) as err:
        read_rows(f"s3://{s3_bucket}-gone/train.jsonl")
    assert describe(err.value).message == (f"storage error: bucket '{s3_bucket}-gone' does not exist "
                                           f"(s3://{s3_bucket}-gone/train.jsonl)")
