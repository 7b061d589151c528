"""How a worker tells the launcher (same pod) how it ended: one small JSON file per local rank.

torchrun reports neither a worker's own account of its exit nor a clean message, so each worker
writes `<outcome>-<local rank>.json` into the directory the launcher gave it (KUBETRAIN_EXIT_DIR):
preempted (its emergency checkpoint is complete), finished (its final checkpoint is complete), or
failed (the reason, the one-line message, and whether another attempt could help); and, from a
worker whose loop failed, progress (its step and the newest complete checkpoint it knows of).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

EXIT_DIR_ENV = "KUBETRAIN_EXIT_DIR"
OUTCOMES = ("preempted", "finished", "failed", "progress")


def write_exit_marker(local_rank: int, outcome: str, **fields) -> None:
    """No-op outside the launcher (no exit directory)."""
    assert outcome in OUTCOMES, outcome
    exit_dir = os.environ.get(EXIT_DIR_ENV)
    if exit_dir:
        Path(exit_dir, f"{outcome}-{local_rank}.json").write_text(json.dumps(fields))


def read_markers(exit_dir: Path, outcome: str) -> dict[int, dict]:
    """local rank -> the fields its `outcome` marker holds; unreadable markers are left out."""
    found = {}
    for path in exit_dir.glob(f"{outcome}-*.json"):
        try:
            found[int(path.stem.rpartition("-")[2])] = json.loads(path.read_text())
        except (ValueError, OSError):
            continue
    return found
