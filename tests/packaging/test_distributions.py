"""What each distribution ships: the kubetrain wheel holds no dev-cluster code, the dev cluster runs from an
installed wheel (not only from this checkout), and the layout rules of the tree hold."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from kubetrain_testkit import REPO

TASK_NAMES = ("sequence-classification", "causal-lm")


def build_wheel(source: Path, parts: list[str], out: Path) -> Path:
    """The wheel of a copy of `parts` of `source` (setuptools builds in place: the checkout stays clean)."""
    tree = out / "src"
    for part in parts:
        copy = shutil.copytree if (source / part).is_dir() else shutil.copy
        copy(source / part, tree / part, **({"ignore": shutil.ignore_patterns("build", "*.egg-info", "__pycache__")}
                                            if (source / part).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(tree)], check=True, capture_output=True, timeout=300)
    return next(out.glob("*.whl"))


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wheels")
    (out / "core" / "src").mkdir(parents=True)
    (out / "dev" / "src").mkdir(parents=True)
    return {"kubetrain": build_wheel(REPO, ["pyproject.toml", "README.md", "src", "operator", "trainer_image"], out / "core"),
            "devcluster": build_wheel(REPO / "devcluster", ["pyproject.toml", "kubetrain_devcluster", "kubetrain_testkit"],
                                      out / "dev")}


def test_the_kubetrain_wheel_holds_no_dev_cluster_module(wheels):
    names = zipfile.ZipFile(wheels["kubetrain"]).namelist()
    packages = {n.split("/")[0] for n in names if n.endswith(".py")}
    assert packages == {"kubetrain", "kubetrain_operator", "kubetrain_trainer"}, packages
    assert not [n for n in names if "devcluster" in n or "testkit" in n]


def test_the_dev_cluster_runs_from_an_installed_wheel(wheels, tmp_path):
    """Installed into a directory of its own and started from elsewhere: nothing may reach into a checkout."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheels["devcluster"])], check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import kubetrain_devcluster.apiserver as a; print(a.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(target)), where
    proc = subprocess.Popen([sys.executable, "-m", "kubetrain_devcluster.apiserver", "--port", "0", "--kubeconfig",
                             str(tmp_path / "kubeconfig")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        line = proc.stdout.readline()
        assert "kubetrain apiserver listening on https://127.0.0.1:" in line and time.monotonic() < deadline, line
    finally:
        proc.terminate()
        proc.wait(10)
    no_examples = subprocess.run([sys.executable, "-c", "from kubetrain_devcluster.cluster import default_image_root; "
                                  "default_image_root()"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert no_examples.returncode != 0 and "--image-root" in no_examples.stderr


def test_no_dev_cluster_module_is_over_600_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (REPO / "devcluster").rglob("*.py")}
    assert sizes and not {name: n for name, n in sizes.items() if n > 600}


def test_the_trainer_branches_on_no_task_name_outside_its_tasks_package():
    trainer = REPO / "trainer_image" / "kubetrain_trainer"
    found = [f"{p.relative_to(REPO)}:{n}" for p in trainer.rglob("*.py") if "tasks" not in p.relative_to(trainer).parts
             for n, line in enumerate(p.read_text().splitlines(), 1) if any(name in line for name in TASK_NAMES)]
    assert not found


def test_tests_and_bench_import_their_helpers_without_path_edits():
    found = [str(p.relative_to(REPO)) for d in ("tests", "bench") for p in (REPO / d).rglob("*.py")
             if re.search(r"sys\.path\.(insert|append)|^\s*(from|import) test_", p.read_text(), re.M)
             and p.name != Path(__file__).name]
    assert not found, "helpers belong in kubetrain_testkit: each layer of tests must run alone"
