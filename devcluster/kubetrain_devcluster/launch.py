"""What a container's process is: argv, env, cwd and the paths mapped into it."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .dns import DnsKey, DnsPending, substitute_dns
from .objects import Pod, pod_key, spec
from .podenv import expand_vars
from .volumes import PathRewriter

DEFAULT_TERMINATION_PATH = "/dev/termination-log"


@dataclasses.dataclass
class Launch:
    """Everything needed to start the container process."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    termination_file: Path


@dataclasses.dataclass(frozen=True)
class LaunchContext:
    """Executor-wide inputs of a launch (same for all pods)."""

    image_roots: Mapping[str, str]
    extra_env: Mapping[str, str]
    python: str
    base_env: Mapping[str, str]


def base_env() -> dict[str, str]:
    """The few host variables a container gets (no host env leaks into pods otherwise)."""
    return {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8")}


def build_launch(pod: Pod, container: Mapping[str, Any], container_env: Mapping[str, str],
                 mounts: Mapping[str, Path], pod_dir: Path, dns: Mapping[DnsKey, str | None],
                 ctx: LaunchContext) -> Launch:
    """argv, env and cwd with $(VAR) expanded, DNS names substituted and container paths rewritten.

    Raises DnsPending when a name's pod has no IP yet.
    """
    namespace = pod_key(pod)[0]
    termination_path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
    termination_file = pod_dir / "termination-log"
    rewrite = PathRewriter({**ctx.image_roots, **{k: str(v) for k, v in mounts.items()},
                            termination_path: str(termination_file)})
    pending: list[str] = []

    def finish(text: str) -> str:
        text, waiting = substitute_dns(text, namespace, dns)
        pending.extend(waiting)
        return rewrite(text)

    raw = [*(container.get("command") or []), *(container.get("args") or [])]
    argv = [finish(expand_vars(str(a), container_env)) for a in raw]
    env = {k: finish(v) for k, v in container_env.items()}
    if pending:
        raise DnsPending(pending)
    if argv and argv[0] in ("python", "python3"):
        argv[0] = ctx.python
    home, tmp = pod_dir / "home", pod_dir / "tmp"
    full_env = {**ctx.base_env, "HOME": str(home), "TMPDIR": str(tmp),
                "HOSTNAME": spec(pod).get("hostname") or pod_key(pod)[1], **ctx.extra_env, **env}
    return Launch(argv, full_env, working_dir(container, rewrite, pod_dir), termination_file)


def working_dir(container: Mapping[str, Any], rewrite: PathRewriter, pod_dir: Path) -> Path:
    """workingDir rewritten; an unmapped one that does not exist here lives under `<pod dir>/rootfs`."""
    wanted = container.get("workingDir")
    if not wanted:
        return pod_dir
    local = Path(rewrite(wanted))
    if str(local) == wanted and not local.is_dir():
        local = pod_dir / "rootfs" / wanted.lstrip("/")
    return local
