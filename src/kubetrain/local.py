"""`kubetrain run --local`: run a TrainingJob as local torchrun groups, one per node, like its pods.

Each node is a `python -m kubetrain_trainer.launch` process (the pods' entry point) joining a c10d
rendezvous on loopback. SIGTERM/SIGINT are forwarded to every node, as Kubernetes does when it
stops pods; the exit code is the group's (0 done, 75 preempted after an emergency checkpoint).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from .api import EXIT_PREEMPTED, JOB_UID_ENV, TrainingJob
from .ports import free_port
from .torchrun import torchrun_options


def node_commands(job: TrainingJob, config: Path, trainer_args: list[str], port: int, rdzv_id: str) -> list[list[str]]:
    """`rdzv_id` prefixes the group's keys in torchrun's unauthenticated store: a random one per run, so another
    local user who finds the port cannot write into the group's keys under a guessed name."""
    spec = job.spec
    return [[sys.executable, "-m", "kubetrain_trainer.launch",
             *torchrun_options(spec.nodes, spec.procs_per_node, f"127.0.0.1:{port}", rdzv_id, node_rank=node),
             "--", "--config", str(config), *trainer_args] for node in range(spec.nodes)]


def group_exit_code(codes: list[int]) -> int:
    """Failures win over preemption, preemption over success."""
    failures = [c for c in codes if c not in (0, EXIT_PREEMPTED)]
    if failures:
        return failures[0]
    return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0


def run_local(job: TrainingJob, config: Path, trainer_args: list[str], env: dict[str, str] | None = None) -> int:
    port = free_port()
    child_env = {**os.environ, **(env or {})}
    child_env.setdefault(JOB_UID_ENV, str(uuid.uuid4()))  # this run is the "object": checkpoint.resume never counts it
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (job.spec.nodes * job.spec.procs_per_node))))
    rdzv_id = f"{job.metadata.name}-{secrets.token_hex(16)}"
    procs = [subprocess.Popen(cmd, env=child_env) for cmd in node_commands(job, config, trainer_args, port, rdzv_id)]

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [p.wait() for p in procs]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return group_exit_code(codes)
