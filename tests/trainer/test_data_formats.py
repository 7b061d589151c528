"""spec.data in Parquet (local or S3) and as a saved datasets.Dataset directory reads the same rows as JSONL,
and a run on it trains exactly what the JSONL run trains; unreadable input is one DataError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetrain_testkit import tiny
from kubetrain_trainer.data import read_rows
from kubetrain_trainer.failures import DataError


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path_factory.mktemp("formats")
    train, _ = tiny.write_corpus(out, n_train=120, n_eval=10)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), out / "train.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(out / "train-dataset"), max_shard_size="2KB")  # several files
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(out / "dict"))
    return {"jsonl": train, "parquet": out / "train.parquet", "dataset": out / "train-dataset", "dict": out / "dict",
            "dir": out}


def test_parquet_and_a_saved_dataset_read_the_rows_of_the_jsonl_in_order(copies):
    want = read_rows(str(copies["jsonl"]))
    assert len(list(copies["dataset"].glob("*.arrow"))) > 1
    assert read_rows(str(copies["parquet"])) == want
    assert read_rows(str(copies["dataset"])) == want
    assert read_rows(str(copies["parquet"]), "parquet") == want


def test_parquet_in_s3_reads_the_same_rows(copies, s3_server, s3_bucket):
    s3_server.client().upload_file(str(copies["parquet"]), s3_bucket, "data/train.parquet")
    assert read_rows(f"s3://{s3_bucket}/data/train.parquet") == read_rows(str(copies["jsonl"]))


def test_unreadable_inputs_are_one_data_error_naming_the_file(copies):
    bad = copies["dir"] / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        read_rows(str(bad))
    with pytest.raises(DataError, match=r"a DatasetDict holds one per split: name the split's directory"):
        read_rows(str(copies["dict"]))
    assert read_rows(str(copies["dict"] / "train")) == read_rows(str(copies["jsonl"]))


@pytest.mark.slow
def test_a_run_on_a_saved_dataset_trains_what_the_jsonl_run_trains(copies, tmp_path):
    tokenizer = tiny.train_tokenizer(tmp_path / "tok", copies["jsonl"])
    logs = {}
    for kind in ("jsonl", "dataset"):
        doc = tiny.job_doc(f"fmt-{kind}", copies[kind], None, tokenizer, str(tmp_path / "ckpt"), training__maxSteps=8)
        run = tiny.LocalRun(tiny.write_job(tmp_path / f"{kind}.yaml", doc), env={}, work_dir=tmp_path / kind)
        assert run.finish() == 0, run.output[-3000:]
        logs[kind] = [m.group(1) for m in run.matches(r"(step \d+/8 .*\| loss \S+) .*\| data (\w+)")]
        logs[kind] += [m.group(1) for m in run.matches(r"\| data (\w+)$")]
    assert logs["jsonl"] and logs["jsonl"] == logs["dataset"]
