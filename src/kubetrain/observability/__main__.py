"""python -m kubetrain.observability [CHART_DIR] [--check]

Writes CHART_DIR/dashboards/<name>.json (one per dashboard) and CHART_DIR/rules/kubetrain-alerts.yaml;
with --check writes nothing and exits 1 if any of them is missing or differs (stale files left in
dashboards/ count as drift too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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
    files = generated_files()
    if args.check:
        problems = []
        for rel, text in files.items():
            path = chart / rel
            current = path.read_text(encoding="utf-8") if path.is_file() else None
            if current != text:
                problems.append(f"{path} {'is missing' if current is None else 'is out of date'}")
        extra = sorted(p for p in (chart / DASHBOARD_DIR).glob("*.json") if f"{DASHBOARD_DIR}/{p.name}" not in files)
        problems += [f"{p} is not generated (a dashboard that no longer exists?)" for p in extra]
        if problems:
            print("\n".join(problems) + f"\nregenerate: python -m kubetrain.observability {chart}", file=sys.stderr)
            return 1
        print(f"{len(files)} generated files under {chart} are up to date")
        return 0
    for rel, text in files.items():
        path = chart / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
