"""The pod entry point's exit code: a worker that failed after its final checkpoint was complete (e.g. SIGABRT
from a C++ thread at interpreter exit) must not make a finished job look failed, and a real failure still does.

torchrun itself is replaced by a stand-in that writes what workers write and raises what torchrun raises."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from kubetrain.api import EXIT_PREEMPTED
from kubetrain_trainer import launch
from kubetrain_trainer.preemption import EXIT_DIR_ENV, write_exit_marker

ARGS = ["--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:1", "--rdzv-id=x",
        "--", "--config", "job.yaml"]


def torchrun_where(markers: dict[int, str], exitcode: int, tmp_path: Path):
    def run(_args) -> None:
        for local_rank, outcome in markers.items():
            write_exit_marker(local_rank, 80, outcome)  # what each worker wrote before it exited
        error_file = tmp_path / "error.json"
        error_file.write_text(json.dumps({"message": "Signal 6 (SIGABRT) received"}))
        raise ChildFailedError("kubetrain_trainer", {1: ProcessFailure(1, 4242, exitcode, str(error_file))})
    return run


@pytest.mark.parametrize("markers, want", [
    ({0: "finished", 1: "finished"}, 0),  # an abort at exit after the final checkpoint: finished
    ({0: "preempted", 1: "preempted"}, EXIT_PREEMPTED),
    ({0: "finished"}, 1),  # local rank 1 died before its final checkpoint completed: a failure
    ({}, 1),
])
def test_the_exit_code_follows_what_every_local_worker_reported(monkeypatch, tmp_path, markers, want):
    import torch.distributed.run as torchrun

    monkeypatch.setattr(torchrun, "run", torchrun_where(markers, -6, tmp_path))
    monkeypatch.setattr(launch, "write_termination_message", lambda text: None)
    monkeypatch.delenv(EXIT_DIR_ENV, raising=False)
    assert launch.main(ARGS) == want
    os.environ.pop(EXIT_DIR_ENV, None)
