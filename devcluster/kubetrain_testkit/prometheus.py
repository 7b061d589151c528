"""A real Prometheus server for tests (Debian's `prometheus` package, installed by scripts/setup-system).

`PrometheusServer(work_dir, scrape_jobs, rule_files)` writes a config (static targets, 1 s scrape and
rule evaluation), starts `prometheus` on a free loopback port with its own TSDB under `work_dir`,
and answers instant queries, targets and alerts through the HTTP API. `promtool(...)` runs promtool.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubetrain_devcluster.cluster import ManagedProcess
from kubetrain.ports import free_port

SETUP_HINT = "install it with scripts/setup-system (Debian's prometheus package)"


def binary(name: str) -> str:
    path = shutil.which(name)
    if not path:
        raise RuntimeError(f"{name} is not on PATH: {SETUP_HINT}")
    return path


def promtool(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True, timeout=timeout)


@dataclass
class ScrapeJob:
    name: str
    targets: list[str]  # host:port
    labels: dict[str, str] = field(default_factory=dict)  # target labels (as relabelling would add them)

    def config(self) -> dict:
        return {"job_name": self.name, "static_configs": [{"targets": self.targets, "labels": self.labels}]}


class PrometheusError(RuntimeError):
    pass


class PrometheusServer:
    def __init__(self, work_dir: Path, scrape_jobs: Iterable[ScrapeJob], rule_files: Iterable[Path] = (),
                 interval: str = "1s"):
        self.work_dir = Path(work_dir)
        self.scrape_jobs, self.rule_files, self.interval = list(scrape_jobs), [Path(p).resolve() for p in rule_files], interval
        self.port = 0
        self.proc: ManagedProcess | None = None
        self.log_path = self.work_dir / "prometheus.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict:
        return {
            "global": {"scrape_interval": self.interval, "scrape_timeout": self.interval,
                       "evaluation_interval": self.interval},
            "rule_files": [str(p) for p in self.rule_files],
            "scrape_configs": [job.config() for job in self.scrape_jobs],
        }

    def start(self, timeout: float = 60) -> PrometheusServer:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        config = self.work_dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        check = promtool("check", "config", str(config))
        if check.returncode != 0:
            raise PrometheusError(f"promtool check config failed:\n{check.stdout}{check.stderr}")
        self.port = free_port()
        argv = [binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={self.work_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle",
                "--storage.tsdb.retention.time=1d", "--log.level=info"]
        process = ManagedProcess("prometheus", argv, self.log_path, "Server is ready to receive web requests")
        try:
            self.proc = process.start(timeout)
        except RuntimeError as err:
            raise PrometheusError(str(err)) from None
        return self

    def stop(self, timeout: float = 20) -> None:
        if self.proc is not None:
            self.proc.stop(timeout)

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # --- HTTP API
    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as err:  # 400/422: a bad query; the body says why
            body = json.loads(err.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query: the result vector as [{'metric': {...}, 'value': [t, 'v']}, ...]."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def targets(self) -> list[dict]:
        return self.api("targets", state="active")["activeTargets"]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def rules(self) -> list[dict]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def wait_for(self, what: str, probe: Callable[[], Any], timeout: float = 60, interval: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        last_error = None
        while True:
            try:
                value = probe()
                if value:
                    return value
            except PrometheusError as err:
                last_error = err
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                     + (f" (last error: {last_error})" if last_error else ""))
            time.sleep(interval)


def scrape(url: str) -> dict[str, float]:
    """One real HTTP scrape of a /metrics URL, flattened to 'name{label=value,...}' -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=5).read().decode()
    flat = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            flat[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return flat
