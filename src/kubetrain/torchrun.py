"""torchrun options for one node of a TrainingJob: the same for local runs and for pods."""

from __future__ import annotations

RDZV_PORT = 29400  # the c10d rendezvous port on node 0 (torchrun's conventional port)


def torchrun_options(nodes: int, procs_per_node: int, endpoint: str, rdzv_id: str, local_addr: str | None = None,
                     is_host: bool | None = None) -> list[str]:
    """One torchrun invocation per node; all nodes of a group meet at `endpoint` (host:port).

    `--max-restarts=0`: a failed worker fails the node at once. Restarts belong to the operator (or
    the user), which recreates the whole group so that it resumes from the newest checkpoint.
    `local_addr` is the address peers reach this node at (the pod IP in a cluster). `is_host` says
    whether this node hosts the rendezvous store (node 0 in a cluster); None lets torchrun guess from
    the endpoint's host name, which is right when every node runs on this machine.
    """
    options = [
        f"--nnodes={nodes}",
        f"--nproc-per-node={procs_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={rdzv_id}",
        "--max-restarts=0",
    ]
    if local_addr:
        options.append(f"--local-addr={local_addr}")
    if is_host is not None:
        options.append(f"--rdzv-conf=is_host={int(is_host)}")
    return options
