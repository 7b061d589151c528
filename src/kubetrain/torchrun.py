"""torchrun options for one node of a TrainingJob: the same for local runs and for pods."""

from __future__ import annotations

RDZV_PORT = 29400  # the rendezvous store's port on node 0 (torchrun's conventional port)


def torchrun_options(nodes: int, procs_per_node: int, endpoint: str, rdzv_id: str, node_rank: int) -> list[str]:
    """One torchrun invocation per node; all nodes of a group meet at `endpoint` (host:port), node 0's store.

    Static rendezvous: node `node_rank` holds global ranks node_rank*procs_per_node onwards, so rank 0 is
    always on node 0 (pod 0), where the operator reads reports, metrics and progress. (c10d's dynamic
    rendezvous numbers nodes by sorting their addresses, then pids: `10.0.0.10` before `10.0.0.9`, the
    first-started process first under one name.) Nor does static rendezvous unpickle anything it reads
    from the unauthenticated store, as c10d's does. A group is all its nodes or none: restarts belong to
    the operator (or the user), which recreates the whole group from the newest checkpoint, so
    `--max-restarts=0`. `rdzv_id` prefixes the group's keys in the store.
    """
    return [
        f"--nnodes={nodes}",
        f"--nproc-per-node={procs_per_node}",
        "--rdzv-backend=static",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={rdzv_id}",
        f"--node-rank={node_rank}",
        "--max-restarts=0",
    ]
