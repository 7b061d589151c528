"""One small storage interface over a local directory and S3.

Checkpoints and data files go through `Storage`, so the checkpoint protocol and the trainer never
care whether they talk to a bucket or to a volume. Keys are always '/'-separated relative names
(S3 semantics), whatever the backend.

Credentials come only from the standard AWS chain (env vars, web identity, instance profile); this
module never reads or logs them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote, urlparse

from .failures import S3_PERMANENT, StorageError, s3_error_code

MiB = 1024 * 1024
DEFAULT_MULTIPART_THRESHOLD = 64 * MiB
S3_MIN_PART_SIZE = 5 * MiB
S3_DELETE_BATCH = 1000  # DeleteObjects accepts at most 1000 keys per request
_TMP_SUFFIX = ".kt-tmp"


class NotFound(FileNotFoundError):
    """The key does not exist (a permanent error: retrying will not help)."""


class Storage(Protocol):
    """What checkpoints and data loading need from a blob store, and nothing more."""

    def put_file(self, local_path: Path, key: str) -> None: ...

    def put_bytes(self, data: bytes, key: str) -> None: ...

    def get_file(self, key: str, local_path: Path) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def list_keys(self, prefix: str) -> list[str]:
        """All keys starting with `prefix` (recursive), sorted."""
        ...

    def delete_keys(self, keys: list[str]) -> None:
        """Delete keys; missing keys are not an error."""
        ...

    def uri(self, key: str) -> str:
        """A human-readable location for logs and errors."""
        ...


def join_key(*parts: str) -> str:
    """Join key parts with '/', ignoring empty parts and stray slashes."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


# --------------------------------------------------------------------------------------------- local


def _fsync_dir(path: Path) -> None:
    """Make a rename durable; best effort (some filesystems refuse to open directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(dest: Path, write: Any) -> None:
    """Write via a temp file in the same directory + fsync + os.replace: readers never see a torn file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


def _copy_from(src: Path) -> Any:
    def write(f: BinaryIO) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, length=MiB)

    return write


def path_inside(root: Path, key: str) -> Path:
    """Where `key` (a relative posix path) lands under `root`; refuses keys that would escape it.

    A key from a listing is someone else's data: `..` parts, absolute keys, empty or `.` parts and
    backslashes are refused (one trailing slash names a directory), and the resolved path (links included) must stay inside `root`.
    """
    parts = key.removesuffix("/").split("/")  # "a/b/": the directory a/b
    if not key or "\\" in key or "\x00" in key or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"invalid storage key: {key!r}")
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"invalid storage key: {key!r} leaves {root}")
    return path


class LocalStorage:
    """A directory as a key/value store (a PVC, a hostPath, or a temp dir in tests)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return path_inside(self.root, key)

    def put_file(self, local_path: Path, key: str) -> None:
        _atomic_write(self._path(key), _copy_from(Path(local_path)))

    def put_bytes(self, data: bytes, key: str) -> None:
        _atomic_write(self._path(key), lambda f: f.write(data))

    def get_file(self, key: str, local_path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFound(self.uri(key))
        _atomic_write(Path(local_path), _copy_from(src))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(self.uri(key)) from None

    def list_keys(self, prefix: str) -> list[str]:
        # Walk only the deepest directory the prefix pins down, not the whole root.
        head = prefix.rpartition("/")[0]
        start = self._path(head) if head else self.root
        return sorted(k for k in self._walk(start) if k.startswith(prefix))

    def _walk(self, start: Path) -> Iterator[str]:
        for dirpath, _dirs, names in os.walk(start):
            for name in names:
                if name.startswith(".") and name.endswith(_TMP_SUFFIX):
                    continue  # an in-flight atomic write
                yield (Path(dirpath) / name).relative_to(self.root).as_posix()

    def delete_keys(self, keys: list[str]) -> None:
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            self._prune_empty_dirs(path.parent)

    def _prune_empty_dirs(self, path: Path) -> None:
        """Remove now-empty parents so a deleted checkpoint leaves no empty step directory."""
        root = self.root.resolve()
        while path.resolve() != root and root in path.resolve().parents:
            try:
                path.rmdir()
            except OSError:
                return
            path = path.parent

    def uri(self, key: str) -> str:
        return str(self._path(key)) if key else str(self.root)


# ------------------------------------------------------------------------------------------------ S3


def _is_not_found(err: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(err, ClientError):
        return False
    code = str(err.response.get("Error", {}).get("Code", ""))
    return code in {"404", "NoSuchKey", "NotFound"}


def _permanent(err: Exception, uri: str) -> Exception:
    """`err` as a StorageError naming the bucket and key when no retry can fix it (missing bucket, access
    denied, bad credentials); else `err` itself (5xx, throttling, the network: transient)."""
    code = s3_error_code(err)
    if code in S3_PERMANENT and not _is_not_found(err):
        bucket = urlparse(uri).netloc
        what = f"bucket {bucket!r} does not exist ({uri})" if code == "NoSuchBucket" else f"{S3_PERMANENT[code]}: {uri}"
        return StorageError(what)
    return err


class S3Storage:
    """An S3 bucket (or any S3-compatible store). Large files go multipart via boto3's transfer manager."""

    def __init__(self, bucket: str, client: Any, transfer_config: Any = None):
        from boto3.s3.transfer import TransferConfig

        self.bucket = bucket
        self.client = client
        self.transfer_config = transfer_config or TransferConfig(
            multipart_threshold=DEFAULT_MULTIPART_THRESHOLD,
            multipart_chunksize=DEFAULT_MULTIPART_THRESHOLD,
        )

    def __repr__(self) -> str:
        return f"S3Storage({self.bucket!r})"

    def _call(self, key: str, op):
        """Run one request; S3's answer as our errors: NotFound, StorageError (permanent), else as raised."""
        try:
            return op()
        except Exception as e:
            if _is_not_found(e):  # a HEAD's 404 does not say whether the key or the bucket is missing
                if not self._bucket_exists():
                    raise StorageError(f"bucket {self.bucket!r} does not exist ({self.uri(key)})") from None
                raise NotFound(self.uri(key)) from None
            error = _permanent(e, self.uri(key))
            if error is e:
                raise
            raise error from None

    def _bucket_exists(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:  # noqa: BLE001 - only a clear 404 says no
            return not (_is_not_found(e) or s3_error_code(e) == "NoSuchBucket")
        return True

    def put_file(self, local_path: Path, key: str) -> None:
        self._call(key, lambda: self.client.upload_file(str(local_path), self.bucket, key, Config=self.transfer_config))

    def put_bytes(self, data: bytes, key: str) -> None:
        self._call(key, lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data))

    def get_file(self, key: str, local_path: Path) -> None:
        """Download atomically (boto3 writes a temp file next to the target and renames it)."""
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        self._call(key, lambda: self.client.download_file(self.bucket, key, str(local_path), Config=self.transfer_config))

    def get_bytes(self, key: str) -> bytes:
        resp = self._call(key, lambda: self.client.get_object(Bucket=self.bucket, Key=key))
        with resp["Body"] as body:
            return body.read()

    def list_keys(self, prefix: str) -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        return self._call(prefix, lambda: sorted(
            obj["Key"]
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix)
            for obj in page.get("Contents", [])
        ))

    def delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), S3_DELETE_BATCH):
            batch = keys[i : i + S3_DELETE_BATCH]
            resp = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            # DeleteObjects reports per-key failures in a 200 response: they must not pass silently.
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise OSError(
                    f"failed to delete {len(errors)} object(s) from s3://{self.bucket}, e.g. "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


# ------------------------------------------------------------------------------------------- opening


def _parse_uri(uri: str) -> tuple[str, str, str]:
    """-> (scheme, bucket-or-path, key-prefix). scheme is 's3' or 'file'."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"S3 URI without a bucket: {uri!r}")
        return "s3", parsed.netloc, parsed.path.strip("/")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"file URI with a remote host is not supported: {uri!r}")
        return "file", unquote(parsed.path), ""
    if parsed.scheme and len(parsed.scheme) > 1:  # a one-letter "scheme" is a Windows drive letter
        raise ValueError(f"unsupported storage URI scheme {parsed.scheme!r} in {uri!r}")
    if not uri:
        raise ValueError("empty storage URI")
    return "file", uri, ""


def _uses_custom_endpoint(endpoint: str | None) -> bool:
    return bool(endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))


def make_s3_client(*, endpoint: str | None = None, region: str | None = None) -> Any:
    """A boto3 S3 client with a few quick retries; path-style addressing for custom endpoints.

    Quick, because long outages are retried (visibly: logged and counted) by the checkpoint store.

    With no `endpoint`, boto3 itself honours AWS_ENDPOINT_URL(_S3). Path style matters there too:
    MinIO and friends usually do not serve bucket-named virtual hosts.
    """
    import boto3
    from botocore.config import Config

    s3_options = {"addressing_style": "path"} if _uses_custom_endpoint(endpoint) else None
    config = Config(retries={"mode": "standard", "max_attempts": 3}, s3=s3_options)
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint or None, region_name=region, config=config
    )


def open_storage(
    uri: str,
    *,
    endpoint: str | None = None,
    region: str | None = None,
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
) -> tuple[Storage, str]:
    """Open `s3://bucket/prefix`, `file:///abs/dir` or a plain path -> (storage, key prefix).

    Files at or above `multipart_threshold` are uploaded/downloaded in parts of that size (S3 needs
    parts of at least 5 MiB, so smaller values are raised to that for the part size).
    """
    scheme, location, prefix = _parse_uri(uri)
    if scheme == "file":
        return LocalStorage(Path(location).expanduser()), ""
    from boto3.s3.transfer import TransferConfig

    transfer = TransferConfig(
        multipart_threshold=multipart_threshold,
        multipart_chunksize=max(multipart_threshold, S3_MIN_PART_SIZE),
    )
    client = make_s3_client(endpoint=endpoint, region=region)
    return S3Storage(location, client, transfer), prefix


def read_uri_bytes(uri: str, *, endpoint: str | None = None, region: str | None = None) -> bytes:
    """Read one whole file (a dataset, a config) from s3://bucket/key, file:///path or a path."""
    scheme, location, key = _parse_uri(uri)
    if scheme == "file":
        return Path(location).expanduser().read_bytes()
    if not key:
        raise ValueError(f"S3 URI names a bucket, not an object: {uri!r}")
    storage, _ = open_storage(f"s3://{location}", endpoint=endpoint, region=region)
    return storage.get_bytes(key)
