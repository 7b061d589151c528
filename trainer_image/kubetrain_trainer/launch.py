"""Pod entry point: torchrun, plus an exit code that tells a preemption from a failure.

torchrun reports neither its workers' exit codes nor why it was stopped: killed by SIGTERM it exits 1,
like any crash. The operator must know "the group saved an emergency checkpoint, restart it" from
"the training failed" from "the training can never work". So this wrapper checks the spec and its
local inputs first, runs torchrun in-process, and reads what each worker wrote (exit_markers): exit
EXIT_PREEMPTED when every local worker saved its emergency checkpoint, 0 when every local worker
finished (the final checkpoint complete, whatever happened at exit after that), EXIT_PERMANENT for
a failure no retry can fix; a failure's one-line message becomes the pod's termination message.

    python -m kubetrain_trainer.launch [torchrun options] -- [trainer options]
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

from kubetrain.api import EXIT_INVALID_SPEC, EXIT_PERMANENT, EXIT_PREEMPTED
from kubetrain.contracts import Reason
from kubetrain.termination import TrainerReport, write_report

from .exit_markers import EXIT_DIR_ENV, read_markers
from .failures import describe, lost_a_peer, one_line

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


def workers_account(exit_dir: Path) -> TrainerReport | None:
    """The failed workers' own one-line account (a permanent failure first: it decides the job), with the
    newest checkpoint a failing worker knew of (rank 0's), so status keeps it; None if no worker wrote one."""
    written = read_markers(exit_dir, "failed")
    if not written:
        return None
    progress = max(read_markers(exit_dir, "progress").values(), key=lambda p: p.get("checkpoint_step") or -1, default={})
    known = {k: progress.get(k) for k in ("step", "checkpoint_step", "checkpoint_uri", "checkpoint_time", "start")}
    f = written[min(written, key=lambda r: (not written[r].get("permanent"), r))]
    return TrainerReport("failed", **known, reason=f.get("reason"), message=f.get("message"),
                         permanent=bool(f.get("permanent")))


def failure_report(exit_dir: Path, failures: dict) -> tuple[TrainerReport, int]:
    """What the pod says when its workers failed: their own account, else torchrun's record of the first failed rank."""
    report = workers_account(exit_dir)
    if report is not None:
        return report, EXIT_PERMANENT if report.permanent else 1
    rank = min(failures)  # keyed by global rank
    first = failures[rank]
    if first.exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-first.exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-first.exitcode}"
    else:
        how = f"exited {first.exitcode}"
    detail = first.message if isinstance(first.message, str) and first.message not in ("", "<N/A>") else ""
    message = one_line(f"worker rank {rank} {how}" + (f": {detail}" if detail else ""))
    return TrainerReport("failed", reason="WorkerFailed", message=message), (
        first.exitcode if 0 < first.exitcode < 256 else 1)


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import determine_local_world_size, get_args_parser, run

    logging.basicConfig(level=logging.INFO, format="%(asctime)s launch: %(message)s", datefmt="%H:%M:%S")
    torchrun_args, trainer_args = split_args(sys.argv[1:] if argv is None else argv)
    refused = preflight(trainer_args)
    if refused is not None:  # nothing started: the same answer as a worker's, sooner
        log.error("%s", refused.message)
        write_report(refused)
        return EXIT_INVALID_SPEC if refused.reason == Reason.INVALID_SPEC else EXIT_PERMANENT
    exit_dir = Path(tempfile.mkdtemp(prefix="kubetrain-exit-"))
    os.environ[EXIT_DIR_ENV] = str(exit_dir)  # inherited by the workers
    os.environ.setdefault(SHUTDOWN_TIMEOUT_ENV, DEFAULT_SHUTDOWN_TIMEOUT_S)
    args = get_args_parser().parse_args([*torchrun_args, "--module", "kubetrain_trainer", *trainer_args])
    local_workers = determine_local_world_size(args.nproc_per_node)  # torchrun's own reading ("gpu", "auto", N)
    try:
        run(args)
        return 0
    except (SignalException, ChildFailedError) as err:
        if len(read_markers(exit_dir, "finished")) >= local_workers:
            # e.g. a C++ thread aborting at interpreter exit (SIGABRT): the final checkpoint is complete, and
            # reporting a failure would make the operator restart a finished job
            log.warning("every local worker finished with its final checkpoint complete; a failure after that "
                        "(%s) is ignored: exit 0", err)
            return 0
        if len(read_markers(exit_dir, "preempted")) >= local_workers:
            log.info("all %d local workers saved the emergency checkpoint: exit %d (preempted)", local_workers, EXIT_PREEMPTED)
            return EXIT_PREEMPTED
        if isinstance(err, SignalException):
            report = workers_account(exit_dir)
            if report is not None:  # a worker had failed already: its account is the pod's report
                write_report(report)
                log.error("stopped by signal %s after a worker failed: %s", err.sigval, report.message)
                return EXIT_PERMANENT if report.permanent else EXIT_SIGTERM
            log.error("stopped by signal %s before an emergency checkpoint completed", err.sigval)
            return EXIT_SIGTERM
        report, code = failure_report(exit_dir, err.failures)
        log.error("%s (exit %d)", report.message, code)
        write_report(report)  # the pod's termination message: status.message and the Events
        return code
    except Exception as err:
        if not lost_a_peer(err):
            raise
        # the agent lost the rendezvous store (node rank 0's agent is gone): a symptom, the peer's account says why
        failure = describe(err)
        log.error("%s (exit 1)", failure.message)
        write_report(TrainerReport("failed", reason=failure.reason, message=failure.message))
        return 1


def preflight(trainer_args: list[str]) -> TrainerReport | None:
    """Refuse, before torchrun starts anything, a job whose spec is invalid or whose local inputs do not exist."""
    from kubetrain.api import SpecError

    from .job_file import load_job, parse_args

    try:
        load_job(parse_args(trainer_args))
    except SpecError as err:
        message = "invalid TrainingJob: " + "; ".join(str(err).splitlines())
        return TrainerReport("failed", None, reason=Reason.INVALID_SPEC, message=message, permanent=True)
    except Exception as err:  # noqa: BLE001 - a missing local input, or a config file that cannot be read
        failure = describe(err)
        return TrainerReport("failed", None, reason=failure.reason, message=failure.message, permanent=failure.permanent)
    return None


if __name__ == "__main__":
    sys.exit(main())
