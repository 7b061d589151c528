"""python -m kubetrain.observability [CHART_DIR] [--check]

Writes CHART_DIR/dashboards/<name>.json (one per dashboard) and CHART_DIR/rules/kubetrain-alerts.yaml;
with --check writes nothing and exits 1 if any of them is missing or differs (stale files left in
dashboards/ count as drift too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..generated import write_or_check

DEFAULT_CHART = "charts/kubetrain"


def generated_files() -> dict[str, str]:
    """Path relative to the chart directory -> content."""
    from .alerts import RULE_FILE, rules_yaml
    from .dashboards import DASHBOARD_DIR, DASHBOARDS, dashboard_json

    files = {f"{DASHBOARD_DIR}/{spec.name}.json": dashboard_json(spec) for spec in DASHBOARDS}
    files[RULE_FILE] = rules_yaml()
    return files


def main(argv: list[str] | None = None) -> int:
    from .dashboards import DASHBOARD_DIR

    parser = argparse.ArgumentParser(prog="python -m kubetrain.observability",
                                     description="Generate the Grafana dashboards and Prometheus alert rules of the chart.")
    parser.add_argument("chart", nargs="?", default=DEFAULT_CHART, help=f"chart directory (default: {DEFAULT_CHART})")
    parser.add_argument("--check", action="store_true", help="fail if the files are out of date; write nothing")
    args = parser.parse_args(argv)
    chart = Path(args.chart)
    files = {chart / rel: text for rel, text in generated_files().items()}
    stale = sorted(p for p in (chart / DASHBOARD_DIR).glob("*.json") if p not in files)
    return write_or_check(files, check=args.check, stale=stale, regenerate=f"python -m kubetrain.observability {chart}")

if __name__ == "__main__":
    sys.exit(main())
