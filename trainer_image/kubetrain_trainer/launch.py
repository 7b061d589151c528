"""Pod entry point: torchrun, plus an exit code that tells a preemption from a failure.

torchrun reports neither its workers' exit codes nor why it was stopped: killed by SIGTERM it exits 1,
like any crash. The operator must know "the group saved an emergency checkpoint, restart it" from
"the training failed". So this wrapper runs torchrun in-process and exits with
EXIT_PREEMPTED when every local worker wrote its emergency-checkpoint marker, and 0 when every local
worker wrote its finished marker (the final checkpoint complete), whatever happened at exit after that.

    python -m kubetrain_trainer.launch [torchrun options] -- [trainer options]
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from kubetrain.api import EXIT_PREEMPTED
from kubetrain.termination import write_termination_message

from .preemption import EXIT_DIR_ENV

EXIT_SIGTERM = 128 + 15
# Seconds torchrun gives workers after SIGTERM before SIGKILL: time to finish the step and upload the
# emergency checkpoint. Keep the pod's terminationGracePeriodSeconds above it. (An env var rather than
# --shutdown-timeout, which torch < 2.13 does not know.)
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
DEFAULT_SHUTDOWN_TIMEOUT_S = "120"
log = logging.getLogger("kubetrain.launch")


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def workers_that(exit_dir: Path, outcome: str) -> int:
    """How many local workers wrote the marker of `outcome` (preempted, finished) before exiting."""
    return len(list(exit_dir.glob(f"{outcome}-*.json")))


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import determine_local_world_size, get_args_parser, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s launch: %(message)s", datefmt="%H:%M:%S")
    torchrun_args, trainer_args = split_args(sys.argv[1:] if argv is None else argv)
    exit_dir = Path(tempfile.mkdtemp(prefix="kubetrain-exit-"))
    os.environ[EXIT_DIR_ENV] = str(exit_dir)  # inherited by the workers
    os.environ.setdefault(SHUTDOWN_TIMEOUT_ENV, DEFAULT_SHUTDOWN_TIMEOUT_S)
    args = get_args_parser().parse_args([*torchrun_args, "--module", "kubetrain_trainer", *trainer_args])
    local_workers = determine_local_world_size(args.nproc_per_node)  # torchrun's own reading ("gpu", "auto", N)
    try:
        run(args)
        return 0
    except (SignalException, ChildFailedError) as err:
        if workers_that(exit_dir, "finished") >= local_workers:
            # e.g. a C++ thread aborting at interpreter exit (SIGABRT): the final checkpoint is complete, and
            # reporting a failure would make the operator restart a finished job
            log.warning("every local worker finished with its final checkpoint complete; a failure after that "
                        "(%s) is ignored: exit 0", err)
            return 0
        if workers_that(exit_dir, "preempted") >= local_workers:
            log.info("all %d local workers saved the emergency checkpoint: exit %d (preempted)", local_workers, EXIT_PREEMPTED)
            return EXIT_PREEMPTED
        if isinstance(err, SignalException):
            log.error("stopped by signal %s before an emergency checkpoint completed", err.sigval)
            return EXIT_SIGTERM
        failures = err.failures
        rank = min(failures)  # keyed by global rank
        first = failures[rank]
        log.error("worker rank %d failed with exit code %s: %s", rank, first.exitcode, first.message)
        # the root cause (the worker's exception, recorded by torchrun) as the pod's termination message
        write_termination_message(f"worker rank {rank} failed with exit code {first.exitcode}: {first.message}")
        return first.exitcode if 0 < first.exitcode < 256 else 1


if __name__ == "__main__":
    sys.exit(main())
