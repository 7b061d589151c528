"""Permanent or transient, and one line a person can read: the trainer's classification of its failures."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from kubetrain_trainer.data import read_rows
from kubetrain_trainer.failures import DataError, Diverged, describe
from kubetrain_trainer.tasks import task_for
from kubetrain_trainer.tasks.classification import label_vocabulary


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize("err, permanent, reason", [
    (DataError("x.jsonl row 3: missing field 'text'"), True, "DataError"),
    (Diverged("non-finite loss at step 7"), True, "Diverged"),
    (client_error("NoSuchBucket", 404), True, "StorageError"),
    (client_error("AccessDenied", 403), True, "StorageError"),
    (client_error("InvalidAccessKeyId", 403), True, "StorageError"),
    (client_error("SlowDown", 503), False, "PodFailed"),
    (client_error("InternalError", 500), False, "PodFailed"),
    (EndpointConnectionError(endpoint_url="http://s3:9000"), False, "PodFailed"),
    (RuntimeError("Connection closed by peer [10.0.0.2]:29500"), False, "PeerLost"),
    (FileNotFoundError(2, "No such file or directory", "/data/train.jsonl"), True, "DataError"),
])
def test_permanent_or_transient(err, permanent, reason):
    failure = describe(err)
    assert (failure.permanent, failure.reason) == (permanent, reason)
    assert "\n" not in failure.message and len(failure.message) <= 600


def test_a_message_is_one_line_with_the_kind_first():
    assert describe(DataError("s3://b/t.jsonl row 2: missing field 'text'")).message == \
        "data error: s3://b/t.jsonl row 2: missing field 'text'"
    assert describe(ValueError("a\n  b\nc")).message == "ValueError: a"


def test_invalid_utf8_names_the_file_and_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"text": "ok", "label": 0}\n{"text": "caf\xe9", "label": 1}\n')
    with pytest.raises(DataError, match=rf"^{path} line 2: not valid UTF-8 \(byte 0xe9 at offset 40\)$"):
        read_rows(str(path))


@pytest.mark.parametrize("rows, message", [
    ([], "t.jsonl: no rows"),
    ([{"text": "a", "label": 0}, {"txt": "b", "label": 1}], "t.jsonl row 2: missing field 'text' (spec.data.textField)"),
    ([{"text": "a", "label": 0}, {"text": None, "label": 1}], "t.jsonl row 2: field 'text' is NoneType, not text (spec.data.textField)"),
    ([{"text": "a"}], "t.jsonl row 1: missing field 'label' (spec.data.labelField)"),
])
def test_bad_rows_name_the_row_and_the_field(rows, message):
    from kubetrain.api import DataSpec

    task = task_for("sequence-classification")
    with pytest.raises(DataError) as err:
        task.encode(rows, None, DataSpec(train="t.jsonl"), "t.jsonl", {"0": 0, "1": 1})
    assert str(err.value) == message


def test_a_label_outside_num_labels_names_its_first_row():
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": 5}]
    with pytest.raises(DataError) as err:
        label_vocabulary(rows, "label", 2, "s3://b/t.jsonl")
    assert str(err.value) == "s3://b/t.jsonl row 3: label '5' is outside 0..1 (spec.model.numLabels=2); labels outside: ['5']"
