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
    raise err


if __name__ == "__main__":
    sys.exit(main())
