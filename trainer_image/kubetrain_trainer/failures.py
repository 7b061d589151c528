"""Why a worker failed, in one line a person can read, and whether another attempt could help.

A permanent error (bad data, a missing bucket, access denied, divergence, a checkpoint written for
another model) would be met again by every retry: the worker exits EXIT_PERMANENT and the operator
fails the job at the first attempt. Anything else (the network, S3 5xx and throttling, a lost peer,
an error we do not know) is transient and retried up to backoffLimit. The one-line message goes
into the pod's termination message (status.message, the Events); the traceback stays in the log.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from kubetrain.contracts import Reason

MAX_MESSAGE = 600  # characters of status.message: one or two lines in `kubectl describe`


class PermanentError(Exception):
    """An error another attempt would meet again; `kind` starts its message, `reason` is the job's reason."""

    reason: str = Reason.DATA_ERROR
    kind: str = "data error"


class DataError(PermanentError, ValueError):
    """Bad input data: the message names the file, the row and the field."""


class StorageError(PermanentError, OSError):
    """A bucket that does not exist, or credentials that may not read or write it: the message names both."""

    reason, kind = Reason.STORAGE_ERROR, "storage error"


class ModelError(PermanentError, ValueError):
    """The model or tokenizer named by spec.model cannot be loaded as given."""

    reason, kind = Reason.MODEL_ERROR, "model error"


class IncompatibleCheckpoint(PermanentError):
    """A checkpoint written for another model or task than this job's."""

    reason, kind = Reason.CHECKPOINT_INCOMPATIBLE, "checkpoint refused"


class Diverged(PermanentError):
    """The loss or gradient norm became NaN or infinite."""

    reason, kind = Reason.DIVERGED, "diverged"


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str
    permanent: bool

    def to_json(self) -> dict:
        return asdict(self)


def one_line(text: str, limit: int = MAX_MESSAGE) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# S3 error codes that no retry fixes; everything else from S3 (5xx, SlowDown, timeouts) is transient.
S3_PERMANENT = {
    "NoSuchBucket": "bucket does not exist",
    "AccessDenied": "access denied",
    "AllAccessDisabled": "access denied",
    "InvalidAccessKeyId": "the access key id is not known to the store (spec.checkpoint.s3Secret)",
    "SignatureDoesNotMatch": "the secret access key is wrong (spec.checkpoint.s3Secret)",
    "InvalidBucketName": "invalid bucket name",
    "403": "access denied",
    "NoSuchKey": "no such object",
    "404": "no such object",
}


def s3_error_code(err: BaseException | None) -> str | None:
    """The S3 error code of a botocore ClientError, also when boto3 wrapped it (S3UploadFailedError)."""
    for _ in range(4):
        if err is None:
            return None
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            error = response.get("Error") or {}
            return str(error.get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")
        err = err.__cause__ or err.__context__
    return None


def lost_a_peer(err: BaseException) -> bool:
    """A collective failed because another rank is gone (killed, its node lost), not a bug of ours; or torchrun's
    agent lost the rendezvous, whose store lives in node rank 0's agent (that pod is gone)."""
    import torch.distributed
    from torch.distributed.elastic.rendezvous import RendezvousError

    text = str(err)
    return isinstance(err, (torch.distributed.DistError, RendezvousError)) or (isinstance(err, RuntimeError) and any(
        sign in text for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL")))


def describe(err: BaseException) -> Failure:
    """The failure `err` stands for: reason, one-line message, permanent or not."""
    if isinstance(err, PermanentError):
        return Failure(err.reason, one_line(f"{err.kind}: {err}"), True)
    code = s3_error_code(err)
    if code in S3_PERMANENT:  # an S3 error that was not wrapped with its bucket and key (still permanent)
        return Failure(Reason.STORAGE_ERROR, one_line(f"storage error: {S3_PERMANENT[code]}: {err}"), True)
    if isinstance(err, UnicodeDecodeError):
        return Failure(Reason.DATA_ERROR, one_line(f"data error: not valid UTF-8 ({err.reason} at byte {err.start})"), True)
    if isinstance(err, FileNotFoundError):
        return Failure(Reason.DATA_ERROR, one_line(f"data error: no such file: {err.filename or err}"), True)
    if type(err).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError: the same batch plan runs out again
        return Failure(Reason.OUT_OF_MEMORY, one_line(
            "out of GPU memory: lower spec.data.maxTokensPerBatch or maxSamplesPerBatch (or use LoRA); "
            f"{str(err).splitlines()[0] if str(err) else ''}"), True)
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if lost_a_peer(err):  # a symptom: the operator prefers the failed peer's own account
        return Failure(Reason.PEER_LOST, one_line(f"lost contact with another worker ({type(err).__name__}: {first})"),
                       False)
    return Failure(Reason.POD_FAILED, one_line(f"{type(err).__name__}: {first}" if first else type(err).__name__), False)
