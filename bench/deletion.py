"""How fast deleting many TrainingJobs takes their pods away, through the real operator and dev cluster.

Creates `--jobs` one-node jobs whose pods cannot be scheduled (a nodeSelector no node has, so they stay
Pending and cost nothing), waits until every pod exists, then deletes every job at once (one
delete-collection request, as `kubectl delete trainingjobs --all`) and times until no TrainingJob
and no pod is left. The operator puts no finalizer on a TrainingJob (it has no
kopf timer: rechecks.py), so a delete is the API server's and the garbage collector's work only.
Prints one JSON line (also written to --out).

    python bench/deletion.py [--jobs 200] [--out bench/results/deletion.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from kubetrain_devcluster.cluster import DevCluster
from kubetrain_testkit.clusterkit import NS, make_corpus, tiny_job


def wait(what: str, probe, timeout: float) -> float:
    started = time.monotonic()
    while not probe():
        if time.monotonic() - started > timeout:
            raise TimeoutError(what)
        time.sleep(0.1)
    return time.monotonic() - started


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, DevCluster(Path(tmp) / "cluster", nodes=2) as cluster:
        corpus = make_corpus(Path(tmp) / "corpus")
        api, core = cluster.custom_api(), cluster.core_api()
        names = [f"del-{i:03d}" for i in range(args.jobs)]

        def create(name: str) -> None:
            doc = tiny_job(cluster, corpus, name)
            doc["spec"].update(nodes=1, nodeSelector={"kubetrain.io/bench": "nowhere"})
            api.create_namespaced_custom_object("kubetrain.io", "v1alpha1", NS, "trainingjobs", doc)

        def jobs() -> list[dict]:
            return api.list_namespaced_custom_object("kubetrain.io", "v1alpha1", NS, "trainingjobs")["items"]

        def pods() -> int:
            return len(core.list_namespaced_pod(NS, label_selector="kubetrain.io/job-name").items)

        started = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, names))
        created_s = time.monotonic() - started
        pods_s = wait("every pod created", lambda: pods() == args.jobs, 600)
        finalizers = sum(1 for j in jobs() if j["metadata"].get("finalizers"))
        started = time.monotonic()  # one request for all, as `kubectl delete trainingjobs --all` sends
        api.delete_collection_namespaced_custom_object("kubetrain.io", "v1alpha1", NS, "trainingjobs")
        deletes_s = time.monotonic() - started
        jobs_gone_s = deletes_s + wait("every job gone", lambda: not jobs(), 300)
        try:
            pods_gone_s = deletes_s + wait("every pod gone", lambda: pods() == 0, 120)
        except TimeoutError:
            left = core.list_namespaced_pod(NS, label_selector="kubetrain.io/job-name").items
            raise TimeoutError(f"{len(left)} pods left, e.g. " + repr([(p.metadata.name, p.spec.node_name, p.status.phase,
                               p.metadata.deletion_timestamp, p.metadata.owner_references) for p in left[:2]])) from None
    result = {
        "bench": "deletion", "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs, Python {platform.python_version()}",
        "jobs": args.jobs, "create_requests_s": round(created_s, 2), "all_pods_created_after_s": round(pods_s, 2),
        "jobs_with_a_finalizer": finalizers, "delete_requests_s": round(deletes_s, 2),
        "all_jobs_gone_after_s": round(jobs_gone_s, 2), "all_pods_gone_after_s": round(pods_gone_s, 2),
        "goal": {"all_pods_gone_within_s": 10, "met": pods_gone_s < 10},
    }
    line = json.dumps(result)
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
