"""The durable checkpoint protocol: how a checkpoint lands safely, not what is in it.

Layout under a base prefix::

    <prefix>/step-000001200/<file>...
    <prefix>/step-000001200/manifest.json      <- written LAST

A checkpoint is complete only once its manifest exists, so a pod killed mid-upload leaves a torn
step directory that is never loaded. Retention deletes a checkpoint's manifest BEFORE its files,
so a half-deleted checkpoint is never mistaken for a complete one. The manifest records each file's
size and sha256, so a restore verifies what it downloaded and falls back to an older checkpoint when
the newest one is damaged.

Exactly one process (rank 0) writes manifests and deletes under a given prefix. A sharded checkpoint
(training.strategy: fsdp) has files from every rank: each uploads its part (`upload_part`), then rank 0
writes the manifest listing them all (`commit`), so it is complete only once every part landed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from kubetrain.api import step_dir_name
from kubetrain.contracts import timestamp

from .failures import PermanentError
from .storage import Storage, join_key

log = logging.getLogger("kubetrain.checkpoint")

FORMAT = 1
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved or restored."""


class CorruptCheckpoint(CheckpointError):
    """A checkpoint's files do not match its manifest (missing, wrong size or wrong hash)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """One complete checkpoint, as described by its manifest."""

    step: int
    uri: str
    files: dict[str, dict[str, Any]] = field(hash=False)  # name -> {"size": int, "sha256": hex}
    meta: dict[str, Any] = field(hash=False)
    created: str = ""

    @property
    def bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files.values())


@dataclass(frozen=True)
class SaveResult:
    info: CheckpointInfo
    seconds: float  # wall time of hashing + upload (retention not included)


def _file_digest(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
        size = os.fstat(f.fileno()).st_size
    return {"size": size, "sha256": sha}


def _check_file_name(name: str) -> None:
    """File names are relative posix paths inside the step directory; the manifest name is reserved."""
    p = PurePosixPath(name)
    if not name or p.is_absolute() or ".." in p.parts or name != p.as_posix() or name == MANIFEST:
        raise ValueError(f"invalid checkpoint file name: {name!r}")


def retry_transient(op: Callable[[], T], label: str, what: str, *, attempts: int, backoff_s: float = 1.0,
                    max_backoff_s: float = 30.0, on_retry: Callable[[], None] | None = None,
                    error: type[Exception] = CheckpointError, logger: logging.Logger = log) -> T:
    """Run `op`, retrying transient failures with capped exponential backoff; a PermanentError (a missing
    bucket, access denied: no retry helps, and its message names it) at once. Checkpoints and exports."""
    delay = backoff_s
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except PermanentError:
            raise
        except Exception as e:
            if attempt == attempts:
                raise error(f"{label}: {what} failed after {attempt} attempts: {type(e).__name__}: {e}") from e
            logger.warning("%s: %s failed (attempt %d/%d, retrying in %.1fs): %s", label, what, attempt, attempts, delay, e)
            if on_retry:
                on_retry()
            time.sleep(delay)
            delay = min(delay * 2, max_backoff_s)
    raise AssertionError("unreachable")


class CheckpointStore:
    """Saves, lists, prunes and restores checkpoints under `prefix` of a `Storage`.

    Uploads are retried with capped exponential backoff on top of botocore's few quick retries, for
    about 2.5 minutes by default: a checkpoint that fails to land is lost training time, and object
    stores do refuse requests for minutes (503 SlowDown). Each retry is logged and reported to
    `on_retry` (a metric, for an alert); a failure that survives them surfaces as a
    `CheckpointError` naming the step and the URI.
    """

    def __init__(
        self,
        storage: Storage,
        prefix: str,
        keep: int,
        *,
        attempts: int = 10,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        on_retry: Callable[[], None] | None = None,
    ):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        if attempts < 1:
            raise ValueError("attempts must be >= 1")
        self.storage = storage
        self.prefix = prefix.strip("/")
        self.keep = keep
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.on_retry = on_retry
        self.kept: set[int] = set()  # steps retention never deletes (output.from: best)
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future[SaveResult]] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CheckpointStore({self.storage.uri(self.prefix)!r}, keep={self.keep})"

    # ---------------------------------------------------------------------------------- keys

    def _step_key(self, step: int) -> str:
        return join_key(self.prefix, step_dir_name(step))

    def _scan(self) -> dict[int, list[str]]:
        """step -> keys under that step directory (one listing; manifests are not read)."""
        base = join_key(self.prefix) + "/" if self.prefix else ""
        steps: dict[int, list[str]] = {}
        for key in self.storage.list_keys(base):
            head, _, rest = key[len(base) :].partition("/")
            m = _STEP_DIR.match(head)
            if m and rest:
                steps.setdefault(int(m.group(1)), []).append(key)
        return steps

    def _is_manifest(self, key: str, step: int) -> bool:
        return key == join_key(self._step_key(step), MANIFEST)

    # -------------------------------------------------------------------------------- saving

    def save(self, step: int, files: dict[str, Path], meta: dict[str, Any]) -> SaveResult:
        """Save synchronously. Goes through the same worker as `save_async`, so order is kept."""
        return self._submit(step, files, meta).result()

    def save_async(self, step: int, files: dict[str, Path], meta: dict[str, Any]) -> Future[SaveResult]:
        """Save in the background worker (one thread: saves land in submission order).

        The local files must stay untouched until the returned future completes: they are hashed
        and uploaded from the worker. Only then may the caller delete or overwrite them.
        """
        future = self._submit(step, files, meta)
        with self._lock:
            self._pending.append(future)
        return future

    def _submit(self, step: int, files: dict[str, Path], meta: dict[str, Any]) -> Future[SaveResult]:
        # Validate in the caller's thread so a programming error fails at the call site.
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        for name in files:
            _check_file_name(name)
        # A JSON round trip: a TypeError now rather than after the upload, a snapshot the caller
        # can no longer mutate, and info.meta equal to what a later list_complete() reads back.
        meta = json.loads(json.dumps(meta))
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubetrain-ckpt")
            return self._executor.submit(self._save, step, dict(files), meta)

    def wait(self) -> SaveResult | None:
        """Block until every pending async save is done; re-raise the first failure.

        Returns the result of the last save submitted, or None if nothing was pending.
        """
        with self._lock:
            pending, self._pending = self._pending, []
        error: BaseException | None = None
        result: SaveResult | None = None
        for future in pending:
            try:
                result = future.result()
            except BaseException as e:  # noqa: BLE001 - collected, re-raised below
                error = error or e
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        """Finish pending saves (re-raising a failure) and stop the worker."""
        try:
            self.wait()
        finally:
            with self._lock:
                executor, self._executor = self._executor, None
            if executor is not None:
                executor.shutdown(wait=True)

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _save(self, step: int, files: dict[str, Path], meta: dict[str, Any]) -> SaveResult:
        """Every failure surfaces as a CheckpointError that names the step and where it was going (a
        PermanentError names the bucket already, and stays permanent)."""
        return self._guarded(step, lambda: self._save_unchecked(step, files, meta))

    def _save_unchecked(self, step: int, files: dict[str, Path], meta: dict[str, Any]) -> SaveResult:
        start = time.monotonic()
        self._clear_existing(step)
        return self._commit(step, self._upload(step, files), meta, start)

    def upload_part(self, step: int, files: dict[str, Path]) -> dict[str, dict[str, Any]]:
        """One rank's share of a sharded checkpoint: its files, uploaded and hashed; no manifest. Every rank
        uploads its part after rank 0's `clear`, then rank 0 alone calls `commit` with all the parts."""
        for name in files:
            _check_file_name(name)
        return self._guarded(step, lambda: self._upload(step, files))

    def clear(self, step: int) -> None:
        """Before the parts of a sharded checkpoint are uploaded (rank 0): an older save of the step goes first."""
        self._guarded(step, lambda: self._clear_existing(step))

    def commit(self, step: int, entries: dict[str, dict[str, Any]], meta: dict[str, Any], started: float) -> SaveResult:
        """The manifest of a checkpoint whose files (every rank's parts) are all uploaded, then retention."""
        meta = json.loads(json.dumps(meta))
        return self._guarded(step, lambda: self._commit(step, entries, meta, started))

    def _guarded(self, step: int, op: Callable[[], T]) -> T:
        try:
            return op()
        except (CheckpointError, PermanentError):
            raise
        except Exception as e:
            raise CheckpointError(f"checkpoint step {step} to {self.storage.uri(self._step_key(step))} failed: "
                                  f"{type(e).__name__}: {e}") from e

    def _upload(self, step: int, files: dict[str, Path]) -> dict[str, dict[str, Any]]:
        step_key = self._step_key(step)
        entries: dict[str, dict[str, Any]] = {}
        for name, path in sorted(files.items()):
            entries[name] = _file_digest(Path(path))  # a missing local file is not retried
            key = join_key(step_key, name)
            self._retry(step, f"upload to {self.storage.uri(key)}",
                        lambda: self.storage.put_file(Path(path), key))
        return entries

    def _commit(self, step: int, entries: dict[str, dict[str, Any]], meta: dict[str, Any], start: float) -> SaveResult:
        step_key = self._step_key(step)
        info = CheckpointInfo(step, self.storage.uri(step_key), entries, meta, timestamp())
        manifest = json.dumps(
            {"format": FORMAT, "step": step, "created": info.created, "files": entries, "meta": meta},
            indent=2,
            sort_keys=True,
        ).encode()
        manifest_key = join_key(step_key, MANIFEST)
        self._retry(step, f"upload to {self.storage.uri(manifest_key)}",
                    lambda: self.storage.put_bytes(manifest, manifest_key))
        seconds = time.monotonic() - start
        log.info(
            "checkpoint step %d saved to %s (%d files, %d bytes, %.2fs)",
            step, info.uri, len(entries), info.bytes, seconds,
        )
        self._prune_quietly()
        return SaveResult(info, seconds)

    def _retry(self, step: int, what: str, op: Callable[[], T]) -> T:
        return retry_transient(op, f"checkpoint step {step}", what, attempts=self.attempts, backoff_s=self.backoff_s,
                               max_backoff_s=self.max_backoff_s, on_retry=self.on_retry)

    def _clear_existing(self, step: int) -> None:
        """Re-saving a step replaces it: drop the old manifest first, so it is torn, never mixed."""
        where = self.storage.uri(self._step_key(step))
        keys = self._retry(step, f"listing {where}", self._scan).get(step, [])
        if keys:
            log.warning("checkpoint step %d already exists at %s; replacing it", step, where)
            self._retry(step, f"deleting {where}", lambda: self._delete_checkpoints({step: keys}))

    # ------------------------------------------------------------------------------ retention

    def _prune_quietly(self) -> None:
        """Retention failures do not fail a save that already landed; the next save retries them."""
        try:
            self.prune()
        except Exception as e:
            log.warning("checkpoint retention under %s failed: %s", self.storage.uri(self.prefix), e)

    def prune(self) -> list[int]:
        """Keep the newest `keep` complete checkpoints; delete older ones and stale torn ones.

        A torn step directory (no manifest) is deleted only when a newer complete checkpoint
        exists. Returns the deleted steps.
        """
        steps = self._scan()
        complete = sorted(
            (s for s, keys in steps.items() if any(self._is_manifest(k, s) for k in keys)), reverse=True
        )
        if not complete:
            return []
        doomed = set(complete[self.keep :]) - self.kept
        doomed |= {s for s in steps if s not in complete and s < complete[0]}
        victims = {s: steps[s] for s in sorted(doomed)}
        self._delete_checkpoints(victims)
        if victims:
            log.info("checkpoint retention deleted steps %s under %s", sorted(victims),
                     self.storage.uri(self.prefix))
        return sorted(victims)

    def _delete_checkpoints(self, victims: dict[int, list[str]]) -> None:
        """Delete all manifests first, then the remaining files."""
        manifests = [k for s, keys in victims.items() for k in keys if self._is_manifest(k, s)]
        others = [k for s, keys in victims.items() for k in keys if not self._is_manifest(k, s)]
        if manifests:
            self.storage.delete_keys(manifests)
        if others:
            self.storage.delete_keys(others)

    # -------------------------------------------------------------------------------- reading

    def list_complete(self) -> list[CheckpointInfo]:
        """Complete checkpoints (a parseable manifest whose step matches its directory), newest first."""
        infos = []
        for step, keys in sorted(self._scan().items(), reverse=True):
            manifest_key = join_key(self._step_key(step), MANIFEST)
            if manifest_key in keys:
                info = self._read_manifest(step, manifest_key)
                if info is not None:
                    infos.append(info)
        return infos

    def _read_manifest(self, step: int, key: str) -> CheckpointInfo | None:
        try:
            doc = json.loads(self.storage.get_bytes(key))
            if doc.get("format") != FORMAT or doc.get("step") != step:
                raise ValueError(f"format {doc.get('format')!r}, step {doc.get('step')!r}")
            files = {
                str(name): {"size": int(e["size"]), "sha256": str(e["sha256"])}
                for name, e in doc["files"].items()
            }
            for name in files:
                _check_file_name(name)  # a hand-edited manifest must not write outside dest_dir
            meta = doc.get("meta") or {}
            if not isinstance(meta, dict):
                raise ValueError("meta is not an object")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("ignoring checkpoint with unreadable manifest %s: %s", self.storage.uri(key), e)
            return None
        return CheckpointInfo(step, self.storage.uri(self._step_key(step)), files, meta,
                              str(doc.get("created", "")))

    def download(self, info: CheckpointInfo, dest_dir: Path) -> dict[str, Path]:
        """Download every file of `info` into `dest_dir` and verify it against the manifest.

        Raises CorruptCheckpoint (and removes what it downloaded) on a missing or mismatching file.
        """
        dest_dir = Path(dest_dir)
        step_key = self._step_key(info.step)
        paths: dict[str, Path] = {}
        try:
            for name, expected in sorted(info.files.items()):
                path = dest_dir / name
                paths[name] = path
                self._download_one(info, join_key(step_key, name), path)
                actual = _file_digest(path)
                if actual != expected:
                    raise CorruptCheckpoint(
                        f"checkpoint step {info.step}: {name} at {info.uri} does not match its "
                        f"manifest (size {actual['size']} vs {expected['size']}, "
                        f"sha256 {actual['sha256'][:12]}.. vs {expected['sha256'][:12]}..)"
                    )
        except BaseException:
            for path in paths.values():
                path.unlink(missing_ok=True)
            raise
        return paths

    def _download_one(self, info: CheckpointInfo, key: str, path: Path) -> None:
        try:
            self.storage.get_file(key, path)
        except FileNotFoundError as e:
            raise CorruptCheckpoint(
                f"checkpoint step {info.step}: {self.storage.uri(key)} is missing"
            ) from e

    def restore_latest(self, dest_dir: Path, accept: Callable[[CheckpointInfo], None] | None = None,
                       skipped: list[str] | None = None) -> tuple[CheckpointInfo, dict[str, Path]] | None:
        """Download the newest usable checkpoint, falling back past corrupt ones; None if none.

        Only corruption triggers the fallback: any other error (network, permissions) propagates,
        since silently resuming from an older checkpoint would throw away training progress.
        `accept(info)` may refuse a checkpoint by raising (before anything is downloaded); each corrupt
        one skipped is appended to `skipped` ("<uri>: why").
        """
        for info in self.list_complete():
            if accept is not None:
                accept(info)
            try:
                return info, self.download(info, dest_dir)
            except CorruptCheckpoint as e:
                log.warning("skipping corrupt checkpoint step %d: %s", info.step, e)
                if skipped is not None:
                    skipped.append(f"{info.uri}: {e}")
        return None
