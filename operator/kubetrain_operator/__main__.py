"""python -m kubetrain_operator: run the operator (kopf) against the cluster in KUBECONFIG or in-cluster.

    python -m kubetrain_operator [--namespace NS ...] [--metrics-port 8080] [--liveness-port 8081]
                                 [--leader-elect --leader-election-namespace NS --leader-election-id NAME]

With --leader-elect several replicas may run: they elect a leader over a Lease (leadership.py), and only
the leader runs kopf; a standby answers /healthz and takes over when the leader dies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import logging
import os
import sys
import threading
from collections.abc import Iterator

import kopf
import kubernetes

from kubetrain.contracts import accept_api_nesting

from .builders import ClusterDefaults
from .kube import Kube
from .leadership import Leadership
from .metrics import OperatorMetrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m kubetrain_operator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--namespace", "-n", action="append", default=[],
                   help="watch only this namespace (repeatable); default: all namespaces")
    p.add_argument("--metrics-port", type=int, default=int(env("KUBETRAIN_OPERATOR_METRICS_PORT", "8080")),
                   help="operator /metrics port; 0 disables")
    p.add_argument("--metrics-addr", default=env("KUBETRAIN_OPERATOR_METRICS_ADDR", "0.0.0.0"))
    p.add_argument("--liveness-port", type=int, default=int(env("KUBETRAIN_OPERATOR_LIVENESS_PORT", "8081")),
                   help="kopf's /healthz port; 0 disables")
    p.add_argument("--default-checkpoint-uri", default=env("KUBETRAIN_DEFAULT_CHECKPOINT_URI"),
                   help="s3:// URI for jobs whose spec.checkpoint.uri is a local path")
    p.add_argument("--default-s3-secret", default=env("KUBETRAIN_DEFAULT_S3_SECRET"),
                   help="Secret with AWS keys for jobs that use the default checkpoint URI")
    p.add_argument("--default-s3-endpoint", default=env("KUBETRAIN_DEFAULT_S3_ENDPOINT"),
                   help="S3 endpoint for jobs that use the default checkpoint URI")
    p.add_argument("--rendezvous-port-range", default=env("KUBETRAIN_RENDEZVOUS_PORT_RANGE"), metavar="LOW-HIGH",
                   help="give each job its own rendezvous port from this range (only where pods share a network, "
                        "e.g. the dev cluster); default: 29400 for every job")
    p.add_argument("--allowed-images", default=env("KUBETRAIN_ALLOWED_IMAGES", ""), metavar="PREFIX,...",
                   help="only trainer images under these prefixes ('registry/team/') or of these repositories "
                        "('registry/team/trainer', any tag); default: any image")
    p.add_argument("--allowed-toleration-keys", default=env("KUBETRAIN_ALLOWED_TOLERATION_KEYS", ""), metavar="KEY,...",
                   help="only tolerations of these taint keys (never a key-less, tolerate-all one); default: any")
    p.add_argument("--no-network-policy", action="store_true", default=env("KUBETRAIN_NETWORK_POLICY", "true") == "false",
                   help="do not give each job a NetworkPolicy isolating its trainer pods")
    p.add_argument("--operator-namespace", default=env("KUBETRAIN_OPERATOR_NAMESPACE"),
                   help="where the operator runs: the trainers' NetworkPolicy lets its pods scrape /metrics")
    p.add_argument("--metrics-namespaces", default=env("KUBETRAIN_METRICS_NAMESPACES", ""), metavar="NS,...",
                   help="namespaces whose pods may scrape trainers' /metrics too (e.g. monitoring)")
    p.add_argument("--leader-elect", action="store_true", default=env("KUBETRAIN_LEADER_ELECT", "false") == "true",
                   help="elect a leader over a Lease, so that several replicas can run (one reconciles)")
    p.add_argument("--leader-election-namespace", default=env("KUBETRAIN_LEADER_ELECTION_NAMESPACE"),
                   help="namespace of the Lease; default: --operator-namespace")
    p.add_argument("--leader-election-id", default=env("KUBETRAIN_LEADER_ELECTION_ID", "kubetrain-operator"),
                   help="name of the Lease")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def split_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def api_client() -> kubernetes.client.ApiClient:
    """A connection for every worker thread (kopf's 16 and the rechecks' 8): with the default pool of
    cpus*5, a burst of jobs discarded connections and paid a TLS handshake per API call."""
    config = kubernetes.client.Configuration.get_default_copy()
    config.connection_pool_maxsize = 32
    return kubernetes.client.ApiClient(config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    accept_api_nesting()  # a TrainingJob nested 1,500 deep must be refused, not crash the watch (and the operator)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # kopf logs every handler run at INFO; our own log and Events say what matters
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    from .handlers import JobRegistry  # importing the module registers the kopf handlers

    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    metrics = OperatorMetrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port, args.metrics_addr)
    ports = tuple(int(x) for x in args.rendezvous_port_range.split("-")) if args.rendezvous_port_range else None
    defaults = ClusterDefaults(args.default_checkpoint_uri, args.default_s3_secret, args.default_s3_endpoint, ports,
                               allowed_images=split_list(args.allowed_images),
                               allowed_toleration_keys=split_list(args.allowed_toleration_keys),
                               network_policy=not args.no_network_policy, operator_namespace=args.operator_namespace,
                               metrics_namespaces=split_list(args.metrics_namespaces))
    memo = kopf.Memo(kube=Kube(api_client()), metrics=metrics, defaults=defaults, jobs=JobRegistry())
    leadership = None
    if args.leader_elect:
        namespace = args.leader_election_namespace or args.operator_namespace
        if not namespace:
            print("--leader-elect needs --leader-election-namespace or --operator-namespace", file=sys.stderr)
            return 2
        leadership = Leadership(namespace, args.leader_election_id).start()
        with standby_health(args.liveness_port):
            leadership.wait()
    metrics.leader.set(1)
    liveness = f"http://0.0.0.0:{args.liveness_port}/healthz" if args.liveness_port else None
    try:
        asyncio.run(kopf.operator(
            standalone=True,  # no kopf peering: alone, or the leader of --leader-elect's election
            namespaces=args.namespace,
            clusterwide=not args.namespace,
            liveness_endpoint=liveness,
            memo=memo,
        ))
    finally:
        if leadership:
            leadership.release()
    return 0


@contextlib.contextmanager
def standby_health(port: int) -> Iterator[None]:
    """/healthz answers 200 while this replica is the standby (kopf's own endpoint takes the port once it leads)."""
    if not port:
        yield
        return

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(200 if self.path == "/healthz" else 404)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(b"standby\n")

        def log_message(self, *_) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Healthy)
    threading.Thread(target=server.serve_forever, name="kubetrain-standby-health", daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    sys.exit(main())
