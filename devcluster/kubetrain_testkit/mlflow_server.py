"""A real `mlflow server` for tests: sqlite backend store, artifacts proxied into an S3 bucket (moto)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from kubetrain.ports import free_port


class MlflowServer:
    """Started on a free loopback port; stopped (and its process group killed) on exit."""

    def __init__(self, state_dir: Path, *, artifacts: str, s3_env: dict[str, str]):
        self.state_dir, self.artifacts, self.s3_env = Path(state_dir), artifacts, s3_env
        self.host, self.port = "127.0.0.1", 0
        self._proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> MlflowServer:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(self.host)
        self._log = tempfile.TemporaryFile()
        env = {**os.environ, **self.s3_env, "MLFLOW_S3_ENDPOINT_URL": self.s3_env["AWS_ENDPOINT_URL"]}
        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", self.host, "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.state_dir / 'mlflow.db'}",
               "--artifacts-destination", self.artifacts]
        self._proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                      cwd=self.state_dir)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self._proc.returncode}:\n{self.output()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"mlflow server not healthy within 120 s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def __exit__(self, *exc) -> None:
        if self._proc and self._proc.poll() is None:
            os.killpg(self._proc.pid, 15)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, 9)
                self._proc.wait()
