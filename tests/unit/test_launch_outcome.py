"""The pod entry point's exit code and termination message: what every local worker reported decides.

A worker that failed after its final checkpoint was complete (e.g. SIGABRT from a C++ thread at
interpreter exit) must not make a finished job look failed; a permanent failure exits EXIT_PERMANENT
with the worker's one-line account; a job whose data file does not exist is refused before torchrun
starts. torchrun itself is replaced by a stand-in that writes what workers write and raises what
torchrun raises (named as such: real torchrun runs in tests/trainer)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from kubetrain.api import EXIT_INVALID_SPEC, EXIT_PERMANENT, EXIT_PREEMPTED
from kubetrain.termination import decode_report
from kubetrain_testkit.tiny import job_doc, write_job
from kubetrain_trainer import launch
from kubetrain_trainer.exit_markers import EXIT_DIR_ENV, write_exit_marker
from kubetrain_trainer.failures import DataError, Diverged, describe

TORCHRUN = ["--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:1", "--rdzv-id=x"]


@pytest.fixture
def job_yaml(tmp_path: Path) -> Path:
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a", "label": 0}\n')
    (tmp_path / "tok").mkdir()
    return write_job(tmp_path / "job.yaml", job_doc("j", train, None, tmp_path / "tok", str(tmp_path / "ckpt")))


def torchrun_where(markers: dict[int, tuple[str, dict]], exitcode: int, tmp_path: Path):
    def run(_args) -> None:
        for local_rank, written in markers.items():
            for outcome, fields in written if isinstance(written, list) else [written]:
                write_exit_marker(local_rank, outcome, **fields)  # what each worker wrote before it exited
        error_file = tmp_path / "error.json"
        error_file.write_text(json.dumps({"message": "Signal 6 (SIGABRT) received"}))
        raise ChildFailedError("kubetrain_trainer", {1: ProcessFailure(1, 4242, exitcode, str(error_file))})
    return run


def launch_with(monkeypatch, job_yaml: Path, markers, exitcode: int = -6) -> tuple[int, str | None]:
    import torch.distributed.run as torchrun

    said: list[str] = []
    monkeypatch.setattr(torchrun, "run", torchrun_where(markers, exitcode, job_yaml.parent))
    monkeypatch.setattr("kubetrain.termination.write_termination_message", said.append)
    monkeypatch.delenv(EXIT_DIR_ENV, raising=False)
    try:
        code = launch.main([*TORCHRUN, "--", "--config", str(job_yaml)])
    finally:
        os.environ.pop(EXIT_DIR_ENV, None)
    return code, said[-1] if said else None


FINISHED, PREEMPTED = ("finished", {"step": 80}), ("preempted", {"step": 80})
BAD_ROW = describe(DataError("s3://b/train.jsonl row 201: missing field 'text' (spec.data.textField)")).to_json()
LOST_PEER = describe(RuntimeError("Connection closed by peer [127.0.0.1]:29500")).to_json()


@pytest.mark.parametrize("markers, want", [
    ({0: FINISHED, 1: FINISHED}, 0),  # an abort at exit after the final checkpoint: finished
    ({0: PREEMPTED, 1: PREEMPTED}, EXIT_PREEMPTED),
    ({0: FINISHED}, 1),  # local rank 1 died before its final checkpoint completed: a failure
    ({}, 1),
    ({0: ("failed", LOST_PEER), 1: ("failed", BAD_ROW)}, EXIT_PERMANENT),  # the permanent cause wins
    ({1: ("failed", LOST_PEER)}, 1),
])
def test_the_exit_code_follows_what_every_local_worker_reported(monkeypatch, job_yaml, markers, want):
    assert launch_with(monkeypatch, job_yaml, markers)[0] == want


def test_a_permanent_failure_is_reported_in_one_line_naming_file_row_and_field(monkeypatch, job_yaml):
    code, message = launch_with(monkeypatch, job_yaml, {0: ("failed", LOST_PEER), 1: ("failed", BAD_ROW)}, exitcode=65)
    report = decode_report(message)
    assert (code, report.outcome, report.permanent, report.reason) == (EXIT_PERMANENT, "failed", True, "DataError")
    assert report.message == "data error: s3://b/train.jsonl row 201: missing field 'text' (spec.data.textField)"


def test_a_worker_killed_without_an_account_is_named_with_its_signal(monkeypatch, job_yaml):
    code, message = launch_with(monkeypatch, job_yaml, {}, exitcode=-9)
    report = decode_report(message)
    assert code == 1 and not report.permanent
    assert report.message.startswith("worker rank 1 was killed by SIGKILL")


def test_a_missing_data_file_is_refused_before_torchrun_starts(monkeypatch, job_yaml):
    doc = job_doc("j", Path("data/trian.jsonl"), None, job_yaml.parent / "tok", "ckpt")
    write_job(job_yaml, doc)
    started = []
    monkeypatch.setattr("torch.distributed.run.run", started.append)
    code, message = launch_with(monkeypatch, job_yaml, {})
    report = decode_report(message)
    assert code == EXIT_PERMANENT and started == []
    assert report.message == (f"data error: spec.data.train: data/trian.jsonl: no such file or directory "
                              f"(relative paths resolve against {job_yaml.parent})")


def test_an_invalid_spec_is_refused_before_torchrun_starts(monkeypatch, job_yaml):
    doc = job_doc("j", job_yaml.parent / "train.jsonl", None, job_yaml.parent / "tok", "ckpt", training__learningRate=-1)
    write_job(job_yaml, doc)
    code, message = launch_with(monkeypatch, job_yaml, {})
    assert code == EXIT_INVALID_SPEC and "spec.training.learningRate" in decode_report(message).message


def test_a_failure_report_keeps_the_newest_checkpoint_a_failing_worker_knew_of(monkeypatch, job_yaml):
    progress = ("progress", {"step": 3, "checkpoint_step": 2, "checkpoint_uri": "s3://b/j/step-000000002",
                             "checkpoint_time": "2026-12-01T12:00:00Z", "start": {"step": 0, "checkpoint": None}})
    diverged = ("failed", describe(Diverged("non-finite loss at step 3")).to_json())
    _, message = launch_with(monkeypatch, job_yaml, {0: [progress, diverged], 1: [diverged]}, exitcode=65)
    report = decode_report(message)
    assert (report.reason, report.step, report.checkpoint_step, report.checkpoint_uri) == (
        "Diverged", 3, 2, "s3://b/j/step-000000002")


def test_an_agent_that_loses_the_rendezvous_store_reports_a_lost_peer_not_a_cause(monkeypatch, job_yaml):
    """The rendezvous store lives in node rank 0's agent: when that pod dies, the other agents' torchrun raises a
    store or rendezvous error. Its report must say PeerLost (a symptom), so the operator keeps the failed
    pod's own account instead of 'pod ... failed: exit code 1' (seen as a flaky operator e2e test)."""
    import torch.distributed.run as torchrun
    from torch.distributed import DistStoreError
    from torch.distributed.elastic.rendezvous import RendezvousConnectionError

    for err in (DistStoreError("Socket Timeout"), RendezvousConnectionError("The connection to the C10d store failed")):
        said: list[str] = []

        def fails(_args, err=err):
            raise err

        monkeypatch.setattr(torchrun, "run", fails)
        monkeypatch.setattr("kubetrain.termination.write_termination_message", said.append)
        try:
            assert launch.main([*TORCHRUN, "--", "--config", str(job_yaml)]) == 1
        finally:
            os.environ.pop(EXIT_DIR_ENV, None)
        report = decode_report(said[-1])
        assert (report.outcome, report.reason, report.permanent) == ("failed", "PeerLost", False), report
        assert report.message.startswith("lost contact with another worker"), report.message
