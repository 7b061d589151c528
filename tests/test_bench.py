"""The benchmark scripts run (tiny, on CPU) so they cannot rot; their numbers belong in BENCHMARKS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_checkpoint_stall_benchmark_runs_and_reports_both_stalls(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "checkpoint_stall.py"), "--tiny", "--repeats", "2",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["model"] == "tiny"
    assert len(result["sync_save_s"]) == len(result["snapshot_s"]) == 2
    assert result["stall_before_s"] > 0 and result["stall_now_s"] > 0 and result["state_bytes"] > 100_000
    assert (tmp_path / "model.pt").stat().st_size > 0 and (tmp_path / "optimizer.pt").stat().st_size > 0


def test_checkpoint_stall_in_loop_benchmark_runs(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "checkpoint_stall_in_loop.py"), "--tiny", "--steps", "4",
                          "--every", "2", "--work", str(tmp_path)], capture_output=True, text=True, timeout=300).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["exit"] == 0
    assert [(c["step"], c["reason"]) for c in result["checkpoints"]] == [(2, "periodic"), (4, "final")]
    assert all(c["stall_s"] > 0 and c["bytes"] > 0 for c in result["checkpoints"])
