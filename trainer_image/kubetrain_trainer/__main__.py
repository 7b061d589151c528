"""Trainer entry point, run by torchrun in each worker: python -m kubetrain_trainer --config job.yaml"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from kubetrain.api import EXIT_INVALID_SPEC, EXIT_PERMANENT, JOB_UID_ENV, SpecError, job_checkpoint_prefix

from .exit_markers import write_exit_marker
from .failures import describe
from .job_file import load_job, parse_args

log = logging.getLogger("kubetrain.trainer")


@record  # torchrun then knows the root cause of a transient failure and the launcher reports it
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    try:
        job = load_job(args)
    except SpecError as err:
        print(f"invalid TrainingJob:\n{err}", file=sys.stderr)
        return EXIT_INVALID_SPEC
    except Exception as err:  # noqa: BLE001 - a missing local input: permanent, said in one line
        return failed(err, local_rank)
    uri = args.checkpoint_uri or job.spec.checkpoint.uri
    uid = job.metadata.uid or os.environ.get(JOB_UID_ENV, "")  # the object's (pods), or one per local run
    port = job.spec.metrics.port if args.metrics_port is None else args.metrics_port

    from .build import RunOptions, build_run  # torch and transformers load only for a valid job
    from .loop import train

    opts = RunOptions(
        work_dir=Path(args.work_dir) / job.metadata.namespace / job.metadata.name,
        checkpoint_prefix_uri=job_checkpoint_prefix(job, uri, uid),
        metrics_port=port or None,
        metrics_addr=os.environ.get("KUBETRAIN_METRICS_ADDR", "0.0.0.0"),
        job_uid=uid,
    )
    try:
        return train(build_run(job, opts))
    except Exception as err:  # noqa: BLE001 - every failure is classified and said in one line
        return failed(err, local_rank)
    finally:
        from .distributed import shutdown

        shutdown()


def failed(err: Exception, local_rank: int) -> int:
    """Log the traceback (the pod log keeps it), leave the one-line account for the launcher; a permanent
    failure exits EXIT_PERMANENT, any other is re-raised for torchrun to record."""
    failure = describe(err)
    traceback.print_exc()
    log.error("%s failure: %s", "permanent" if failure.permanent else "transient", failure.message)
    write_exit_marker(local_rank, "failed", **failure.to_json())
    if failure.permanent:
        return EXIT_PERMANENT
    err.kubetrain_reported = True  # printed: the exit below need not print it again
    raise err


def exit_process(code: int) -> None:
    """End the worker without interpreter finalization, once its own cleanup is done.

    A worker that finished (final checkpoint complete, process group destroyed) was seen aborting at
    exit: "terminate called without an active exception", SIGABRT, which is libstdc++'s std::terminate
    from a C++ std::thread object destroyed while still joinable, during the static destruction that
    runs after Python's finalization (a native thread pool outliving the interpreter). Nothing of ours
    needs finalization after main (logs flushed here, checkpoints complete, markers written), so the
    process leaves with os._exit: no static destructors run, and its exit code is main's.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    try:
        status = main()
    except SystemExit as stop:  # argparse
        status = stop.code if isinstance(stop.code, int) else 1
    except BaseException as err:  # noqa: BLE001 - a transient failure; @record wrote torchrun's error file
        if not getattr(err, "kubetrain_reported", False):
            traceback.print_exc()
        status = 1
    exit_process(status)
