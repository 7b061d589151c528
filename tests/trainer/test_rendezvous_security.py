"""torchrun's rendezvous store is unauthenticated, and c10d's dynamic rendezvous has every agent unpickle the
state it finds under `torch.rendezvous.<run id>`: a process outside the job that reaches the store port and
can guess the id plants code the agents run. (Our nodes use static rendezvous, which unpickles nothing, under
a random id.) Real `kubetrain run --local` nodes here, and a real TCPStore client as the attacker: it writes
a crafted state under every id it can derive from the job, and must change nothing."""

from __future__ import annotations

import base64
import os
import pickle
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from torch.distributed import TCPStore

from kubetrain_testkit import tiny

pytestmark = pytest.mark.slow


class Planted:
    """Unpickling this creates the marker file: what `pickle.loads` of attacker data may do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def rendezvous_port(deadline: float) -> int | None:
    """The store port, read from the nodes' command lines (what `ps` shows any local user)."""
    while time.monotonic() < deadline:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                args = cmdline.read_bytes().split(b"\0")
            except OSError:
                continue
            if b"kubetrain_trainer.launch" in args and any(b"planted-job" in a for a in args):
                found = next((a for a in args if a.startswith(b"--rdzv-endpoint=")), None)
                if found:
                    return int(found.rsplit(b":", 1)[1])
        time.sleep(0.05)
    return None


def test_a_process_outside_the_job_cannot_make_the_agents_load_its_state(tmp_path):
    train, evals = tiny.write_corpus(tmp_path / "corpus", n_train=64, n_eval=8)
    doc = tiny.job_doc("planted-job", train, evals, tiny.train_tokenizer(tmp_path / "tok", train), str(tmp_path / "ckpt"),
                       nodes=2, training__maxSteps=3)
    job = tiny.write_job(tmp_path / "job.yaml", doc)
    marker = tmp_path / "attacker-code-ran"
    payload = base64.b64encode(pickle.dumps((Planted(marker), 0)))
    guessable = [f"{ns}-planted-job" for ns in ("default", doc["metadata"].get("namespace", "default"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, "-m", "kubetrain.cli", "run", "--local", str(job), "--work-dir",
                            str(tmp_path / "work")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = rendezvous_port(time.monotonic() + 60)
        assert port, "the nodes started"
        store = TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=30))
        deadline = time.monotonic() + 20
        planted = 0
        while time.monotonic() < deadline and run.poll() is None:  # keep planting through the rendezvous
            try:
                for run_id in guessable:
                    store.set("torch.rendezvous." + run_id, payload)
                planted += 1
            except RuntimeError:  # DistNetworkError: the store went away with the finished group
                break
            time.sleep(0.02)
        assert planted, "the attacker reached the store"
        out, _ = run.communicate(timeout=240)
    finally:
        if run.poll() is None:
            run.kill()
    assert not marker.exists(), "an agent unpickled the planted state"
    assert run.returncode == 0 and "finished at step 3" in out, out[-3000:]
