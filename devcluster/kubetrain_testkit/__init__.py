"""The test harness shared by tests/ and bench/: tiny models and jobs, polling, a Prometheus server, dev-cluster helpers.

Installed (editable) with the dev cluster, so tests and benchmarks import it like any package. It
is used from a checkout: `REPO` is the repository it lives in (examples/, crds/, charts/).
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
