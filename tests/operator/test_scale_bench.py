"""bench/operator_scale.py at toy size, so the benchmark cannot rot, and what it shows about idle jobs: the
periodic looks at running jobs read nothing from the API server (they plan from the watch cache) and write
only their progress, and a new job's pod events read nothing either."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kubetrain_testkit import REPO


def test_idle_running_jobs_cost_one_status_write_per_look_and_no_reads(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    subprocess.run([sys.executable, str(REPO / "bench" / "operator_scale.py"), "--burst", "3", "--total", "3",
                    "--window", "25", "--settle", "2", "--out", str(out)], check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    assert result["burst"]["jobs"] == 3 and 0 < result["burst"]["p50_s"] <= result["burst"]["p99_s"]
    # from create to Running, one fresh look per job (its create handler's); its pod events plan from the cache
    assert result["burst"]["operator_calls_to_running_by_verb"]["list pods"] == 3, result["burst"]
    for window in result["idle"]:
        calls = window["operator_api_calls_by_verb"]
        assert calls.get("patch trainingjobs", 0) >= 3, calls  # every job's progress written at least once
        reads = {k: v for k, v in calls.items() if k.split()[0] in ("get", "list")}
        assert not reads, f"idle looks read the API server: {reads}"
        assert window["status_step_lag_s"]["max"] < 30
