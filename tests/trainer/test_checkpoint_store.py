"""The checkpoint protocol: manifest last, retention, torn and corrupt checkpoints, async saves."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

import pytest

from kubetrain_trainer.checkpoint_store import (
    CheckpointError,
    CheckpointStore,
    CorruptCheckpoint,
)
from kubetrain_trainer.failures import StorageError
from kubetrain_trainer.storage import LocalStorage, S3Storage, Storage, open_storage


class Wrapped:
    """A Storage that delegates everything; tests override single methods to inject behaviour."""

    def __init__(self, inner: Storage):
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class FailingManifest(Wrapped):
    """The pod dies between the files and the manifest: a torn checkpoint."""

    def put_bytes(self, data: bytes, key: str) -> None:
        if key.endswith("manifest.json"):
            raise ConnectionError("injected: manifest upload failed")
        self.inner.put_bytes(data, key)


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return open_storage(f"s3://{bucket}")[0]


@pytest.fixture
def local_storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "store")


def make_files(dir: Path, step: int) -> dict[str, Path]:
    dir.mkdir(parents=True, exist_ok=True)
    files = {"model.safetensors": dir / f"model-{step}", "optimizer.pt": dir / f"opt-{step}"}
    files["model.safetensors"].write_bytes(f"weights for step {step}".encode() * 100)
    files["optimizer.pt"].write_bytes(f"optimizer {step}".encode())
    return files


def fast_store(storage: Storage, keep: int = 3, **kw) -> CheckpointStore:
    kw = {"attempts": 3, "backoff_s": 0.001, "max_backoff_s": 0.004, **kw}
    return CheckpointStore(storage, "runs/job-1/ckpt", keep=keep, **kw)


def test_save_list_restore_round_trip(storage: Storage, tmp_path: Path) -> None:
    store = fast_store(storage)
    files = make_files(tmp_path / "src", 120)
    result = store.save(120, files, {"epoch": 1, "loss": 0.5})

    assert result.seconds >= 0
    info = result.info
    assert info.step == 120
    assert info.uri == storage.uri("runs/job-1/ckpt/step-000000120")
    assert info.meta == {"epoch": 1, "loss": 0.5}
    assert info.bytes == sum(p.stat().st_size for p in files.values())
    assert info.files["optimizer.pt"] == {
        "size": files["optimizer.pt"].stat().st_size,
        "sha256": hashlib.sha256(files["optimizer.pt"].read_bytes()).hexdigest(),
    }
    assert storage.list_keys("runs/") == [
        "runs/job-1/ckpt/step-000000120/manifest.json",
        "runs/job-1/ckpt/step-000000120/model.safetensors",
        "runs/job-1/ckpt/step-000000120/optimizer.pt",
    ]
    manifest = json.loads(storage.get_bytes("runs/job-1/ckpt/step-000000120/manifest.json"))
    assert manifest["format"] == 1 and manifest["step"] == 120
    assert manifest["created"].endswith("Z")
    assert manifest["files"] == info.files and manifest["meta"] == info.meta

    assert store.list_complete() == [info]
    restored = store.restore_latest(tmp_path / "restore")
    assert restored is not None
    got_info, paths = restored
    assert got_info == info
    assert set(paths) == set(files)
    for name, path in paths.items():
        assert path == tmp_path / "restore" / name
        assert path.read_bytes() == files[name].read_bytes()


def test_empty_store(local_storage: LocalStorage, tmp_path: Path) -> None:
    store = fast_store(local_storage)
    assert store.list_complete() == []
    assert store.restore_latest(tmp_path / "restore") is None
    assert store.wait() is None
    store.close()


def test_retention_keeps_newest(storage: Storage, tmp_path: Path) -> None:
    store = fast_store(storage, keep=3)
    for step in (10, 20, 30, 40, 50):
        store.save(step, make_files(tmp_path / "src", step), {"step": step})

    assert [i.step for i in store.list_complete()] == [50, 40, 30]
    keys = storage.list_keys("")
    assert not [k for k in keys if "step-000000010" in k or "step-000000020" in k]
    for step in (30, 40, 50):
        assert f"runs/job-1/ckpt/step-{step:09d}/manifest.json" in keys
    assert len(keys) == 3 * 3
    restored = store.restore_latest(tmp_path / "restore")
    assert restored is not None and restored[0].step == 50


def test_retention_deletes_manifest_before_files(local_storage: LocalStorage, tmp_path: Path) -> None:
    deletes: list[list[str]] = []

    class Recording(Wrapped):
        def delete_keys(self, keys: list[str]) -> None:
            deletes.append(list(keys))
            self.inner.delete_keys(keys)

    store = fast_store(Recording(local_storage), keep=1)
    store.save(1, make_files(tmp_path / "src", 1), {})
    store.save(2, make_files(tmp_path / "src", 2), {})

    flat = [k for batch in deletes for k in batch]
    assert set(flat) == {f"runs/job-1/ckpt/step-000000001/{n}" for n in
                         ("manifest.json", "model.safetensors", "optimizer.pt")}
    manifest_call = next(i for i, b in enumerate(deletes) if any(k.endswith("manifest.json") for k in b))
    file_call = next(i for i, b in enumerate(deletes) if any(k.endswith(".pt") for k in b))
    assert manifest_call < file_call
    assert deletes[manifest_call] == ["runs/job-1/ckpt/step-000000001/manifest.json"]


def test_torn_checkpoint_is_ignored_then_cleaned_up(storage: Storage, tmp_path: Path) -> None:
    store = fast_store(storage)
    good = store.save(10, make_files(tmp_path / "src", 10), {}).info

    torn_store = fast_store(FailingManifest(storage))
    with pytest.raises(CheckpointError, match=r"step 20.*manifest\.json"):
        torn_store.save(20, make_files(tmp_path / "src", 20), {})
    torn_keys = storage.list_keys("runs/job-1/ckpt/step-000000020/")
    assert torn_keys == [
        "runs/job-1/ckpt/step-000000020/model.safetensors",
        "runs/job-1/ckpt/step-000000020/optimizer.pt",
    ]

    assert store.list_complete() == [good]
    restored = store.restore_latest(tmp_path / "restore")
    assert restored is not None and restored[0] == good

    # A torn dir newer than every complete checkpoint is left alone (it is not "older")...
    store.save(5, make_files(tmp_path / "src", 5), {})
    assert storage.list_keys("runs/job-1/ckpt/step-000000020/") == torn_keys
    # ...but once a newer complete checkpoint exists, retention removes it.
    store.save(30, make_files(tmp_path / "src", 30), {})
    assert storage.list_keys("runs/job-1/ckpt/step-000000020/") == []
    assert [i.step for i in store.list_complete()] == [30, 10, 5]


def test_corrupt_newest_falls_back_to_older(
    s3_bucket: str, s3_server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage, prefix = open_storage(f"s3://{s3_bucket}/ckpt")
    assert isinstance(storage, S3Storage)
    store = CheckpointStore(storage, prefix, keep=3)
    store.save(10, make_files(tmp_path / "src", 10), {"n": 10})
    store.save(20, make_files(tmp_path / "src", 20), {"n": 20})
    # Same size, different bytes: only the hash can tell.
    key = "ckpt/step-000000020/optimizer.pt"
    original = s3_server.client().get_object(Bucket=s3_bucket, Key=key)["Body"].read()
    s3_server.client().put_object(Bucket=s3_bucket, Key=key, Body=bytes(len(original)))

    with caplog.at_level(logging.WARNING, logger="kubetrain.checkpoint"):
        restored = store.restore_latest(tmp_path / "restore")
    assert restored is not None
    info, paths = restored
    assert info.step == 10 and info.meta == {"n": 10}
    assert paths["optimizer.pt"].read_bytes() == b"optimizer 10"
    warnings = [r for r in caplog.records if r.name == "kubetrain.checkpoint" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step 20" in warnings[0].getMessage()
    assert "optimizer.pt" in warnings[0].getMessage()

    with pytest.raises(CorruptCheckpoint, match="optimizer.pt"):
        store.download(store.list_complete()[0], tmp_path / "direct")


def test_missing_file_is_corrupt(local_storage: LocalStorage, tmp_path: Path) -> None:
    store = fast_store(local_storage)
    store.save(1, make_files(tmp_path / "src", 1), {})
    store.save(2, make_files(tmp_path / "src", 2), {})
    local_storage.delete_keys(["runs/job-1/ckpt/step-000000002/model.safetensors"])
    info = store.list_complete()[0]
    assert info.step == 2  # still has its manifest
    with pytest.raises(CorruptCheckpoint, match="missing"):
        store.download(info, tmp_path / "dl")
    assert not list((tmp_path / "dl").rglob("*.*"))  # partial download cleaned up
    restored = store.restore_latest(tmp_path / "restore")
    assert restored is not None and restored[0].step == 1


def test_unreadable_manifests_are_ignored(local_storage: LocalStorage, tmp_path: Path) -> None:
    store = fast_store(local_storage)
    store.save(1, make_files(tmp_path / "src", 1), {})
    local_storage.put_bytes(b"{not json", "runs/job-1/ckpt/step-000000002/manifest.json")
    bad_step = {"format": 1, "step": 99, "created": "", "files": {}, "meta": {}}
    local_storage.put_bytes(json.dumps(bad_step).encode(), "runs/job-1/ckpt/step-000000003/manifest.json")
    escape = {"format": 1, "step": 4, "created": "", "files": {"../x": {"size": 1, "sha256": "0"}}, "meta": {}}
    local_storage.put_bytes(json.dumps(escape).encode(), "runs/job-1/ckpt/step-000000004/manifest.json")
    local_storage.put_bytes(b"x", "runs/job-1/ckpt/not-a-step/manifest.json")
    assert [i.step for i in store.list_complete()] == [1]


def test_save_async_serializes_in_order(local_storage: LocalStorage, tmp_path: Path) -> None:
    events: list[tuple[str, str, int]] = []
    lock = threading.Lock()

    class Slow(Wrapped):
        def put_file(self, local_path: Path, key: str) -> None:
            thread = threading.current_thread().name
            with lock:
                events.append(("start", key, threading.get_ident()))
            time.sleep(0.02)
            self.inner.put_file(local_path, key)
            with lock:
                events.append(("end", key, threading.get_ident()))
            assert thread.startswith("kubetrain-ckpt")

    store = fast_store(Slow(local_storage), keep=5)
    futures = [store.save_async(s, make_files(tmp_path / f"src{s}", s), {"s": s}) for s in (1, 2, 3)]
    assert not all(f.done() for f in futures)  # really in the background
    last = store.wait()
    assert last is not None and last.info.step == 3
    assert [f.result().info.step for f in futures] == [1, 2, 3]

    # One upload at a time, whole saves in submission order, all in one worker thread.
    kinds = [e[0] for e in events]
    assert kinds == ["start", "end"] * 6
    steps = [int(e[1].split("step-")[1][:9]) for e in events]
    assert steps == sorted(steps)
    assert len({e[2] for e in events}) == 1
    assert [i.step for i in store.list_complete()] == [3, 2, 1]
    store.close()


def test_wait_reraises_upload_failure_after_retries(
    local_storage: LocalStorage, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[str] = []

    class Broken(Wrapped):
        def put_file(self, local_path: Path, key: str) -> None:
            if "step-000000002" in key:
                attempts.append(key)
                raise ConnectionError("injected: connection reset")
            self.inner.put_file(local_path, key)

    store = fast_store(Broken(local_storage), attempts=4)
    with caplog.at_level(logging.WARNING, logger="kubetrain.checkpoint"):
        f1 = store.save_async(1, make_files(tmp_path / "s1", 1), {})
        f2 = store.save_async(2, make_files(tmp_path / "s2", 2), {})
        f3 = store.save_async(3, make_files(tmp_path / "s3", 3), {})
        with pytest.raises(CheckpointError) as exc_info:
            store.wait()

    err = exc_info.value
    assert "step 2" in str(err) and "after 4 attempts" in str(err)
    assert local_storage.uri("runs/job-1/ckpt/step-000000002/") in str(err)
    assert isinstance(err.__cause__, ConnectionError)
    assert len(attempts) == 4 and len(set(attempts)) == 1  # the first file, retried, then gave up
    assert f1.result().info.step == 1 and f3.result().info.step == 3
    assert isinstance(f2.exception(), CheckpointError)
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 3
    assert [i.step for i in store.list_complete()] == [3, 1]
    assert store.wait() is None  # the failure was reported once
    store.close()


def test_transient_failure_is_retried(local_storage: LocalStorage, tmp_path: Path) -> None:
    failures = [ConnectionError("blip"), TimeoutError("blip")]

    class Flaky(Wrapped):
        def put_file(self, local_path: Path, key: str) -> None:
            if failures:
                raise failures.pop(0)
            self.inner.put_file(local_path, key)

    retries: list[int] = []
    store = fast_store(Flaky(local_storage), on_retry=lambda: retries.append(1))
    assert store.save(7, make_files(tmp_path / "src", 7), {}).info.step == 7
    assert not failures and len(retries) == 2  # each retry reported (the trainer counts them in a metric)
    assert [i.step for i in store.list_complete()] == [7]


def test_backoff_doubles_and_is_capped(local_storage: LocalStorage, tmp_path: Path, monkeypatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr("kubetrain_trainer.checkpoint_store.time.sleep", sleeps.append)

    class Down(Wrapped):
        def put_file(self, local_path: Path, key: str) -> None:
            raise ConnectionError("down")

    store = CheckpointStore(Down(local_storage), "p", keep=1, attempts=6, backoff_s=0.5, max_backoff_s=4)
    with pytest.raises(CheckpointError):
        store.save(1, make_files(tmp_path / "src", 1), {})
    assert sleeps == [0.5, 1.0, 2.0, 4.0, 4.0]


def test_missing_local_file_fails_without_retrying(local_storage: LocalStorage, tmp_path: Path) -> None:
    store = fast_store(local_storage)
    with pytest.raises(CheckpointError, match="step 1"):
        store.save(1, {"gone.bin": tmp_path / "does-not-exist"}, {})
    assert store.list_complete() == []


def test_resaving_a_step_replaces_it(local_storage: LocalStorage, tmp_path: Path) -> None:
    store = fast_store(local_storage)
    store.save(5, make_files(tmp_path / "a", 5), {"v": 1})
    other = tmp_path / "b.bin"
    other.write_bytes(b"new")
    store.save(5, {"only.bin": other}, {"v": 2})
    [info] = store.list_complete()
    assert info.meta == {"v": 2} and set(info.files) == {"only.bin"}
    assert local_storage.list_keys("runs/job-1/ckpt/step-000000005/") == [
        "runs/job-1/ckpt/step-000000005/manifest.json",
        "runs/job-1/ckpt/step-000000005/only.bin",
    ]


def test_nested_file_names(local_storage: LocalStorage, tmp_path: Path) -> None:
    src = tmp_path / "cfg.json"
    src.write_text("{}")
    store = fast_store(local_storage)
    store.save(1, {"adapter/config.json": src}, {})
    info, paths = store.restore_latest(tmp_path / "r")  # type: ignore[misc]
    assert paths["adapter/config.json"] == tmp_path / "r" / "adapter" / "config.json"
    assert paths["adapter/config.json"].read_text() == "{}"


def test_bad_arguments_fail_at_call_site(local_storage: LocalStorage, tmp_path: Path) -> None:
    store = fast_store(local_storage)
    f = tmp_path / "f"
    f.write_bytes(b"x")
    for name in ["manifest.json", "../x", "/abs", "", "a//b"]:
        with pytest.raises(ValueError):
            store.save_async(1, {name: f}, {})
    with pytest.raises(ValueError):
        store.save(-1, {"f": f}, {})
    with pytest.raises(TypeError):
        store.save(1, {"f": f}, {"obj": object()})
    with pytest.raises(ValueError):
        CheckpointStore(local_storage, "p", keep=0)
    assert local_storage.list_keys("") == []


def test_a_missing_bucket_fails_the_save_at_once_naming_it_without_retries(s3_bucket: str, tmp_path: Path) -> None:
    storage, _ = open_storage(f"s3://{s3_bucket}-does-not-exist/ckpt")
    retries = []
    store = fast_store(storage, attempts=5)
    store.on_retry = lambda: retries.append(1)
    future = store.save_async(3, make_files(tmp_path / "src", 3), {})
    with pytest.raises(StorageError, match=rf"bucket '{s3_bucket}-does-not-exist' does not exist \(s3://{s3_bucket}-does"):
        store.wait()
    assert future.done() and retries == []
    store.close()


def test_snapshot_to_cpu_is_a_copy_that_training_cannot_change():
    """The checkpoint is taken from a snapshot while training goes on: later updates must not leak in."""
    import torch

    from kubetrain_trainer.host_copies import snapshot_to_cpu

    weights = torch.ones(3)
    state = {"model.pt": {"w": weights}, "optimizer.pt": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": weights * 2}},
                                                          "param_groups": [{"lr": 0.1, "params": [0]}]}}
    snap = snapshot_to_cpu(state)
    weights.add_(1.0)
    state["optimizer.pt"]["state"][0]["exp_avg"].zero_()
    assert torch.equal(snap["model.pt"]["w"], torch.ones(3))
    assert torch.equal(snap["optimizer.pt"]["state"][0]["exp_avg"], torch.full((3,), 2.0))
    assert snap["optimizer.pt"]["param_groups"] == [{"lr": 0.1, "params": [0]}]
