"""The container filesystem stand-in: volumes materialized under the pod directory, mount paths rewritten."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .objects import Pod, pod_key, spec
from .podenv import ConfigError, PodFacts, Sources, field_ref_value

log = logging.getLogger("kubetrain_devcluster.executor")


class PathRewriter:
    """Rewrites container paths (mounts, termination file, image roots) to local paths inside strings.

    A prefix matches on a path boundary: it must not continue a longer path or word before it
    (except after `file://`) and must be followed by `/`, the end, or a character that cannot be part
    of a file name. Longest prefixes are tried first, in one pass, so output is never rewritten twice.
    """

    def __init__(self, mapping: Mapping[str, str | Path]):
        cleaned = {_clean_path(p): str(local) for p, local in mapping.items() if p.startswith("/")}
        cleaned.pop("/", None)
        self.mapping = cleaned
        prefixes = sorted(cleaned, key=len, reverse=True)
        self._pattern = re.compile(
            r"(?:(?<=://)|(?<![\w.~/-]))(" + "|".join(map(re.escape, prefixes)) + r")(?=/|$|[^\w.~-])"
        ) if prefixes else None

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(lambda m: self.mapping[m.group(1)], text)


def _clean_path(path: str) -> str:
    """`/a//b/` -> `/a/b`, without resolving anything on disk."""
    parts = [p for p in path.split("/") if p and p != "."]
    return "/" + "/".join(parts)





def safe_relative(path: str) -> Path:
    """A volume item path must stay inside its volume."""
    rel = Path(path)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ConfigError(f"invalid volume item path {path!r}")
    return rel


def write_key_files(target: Path, data: Mapping[str, bytes] | None, items: list[Mapping[str, Any]] | None,
                    optional: bool, what: str) -> None:
    """A configMap/secret volume: all keys as files, or only `items` under their paths."""
    target.mkdir(parents=True, exist_ok=True)
    if data is None:
        if optional:
            return
        raise ConfigError(f"MountVolume.SetUp failed: {what} not found", reason="ContainerCreating")
    chosen = [(i.get("key", ""), i.get("path") or i.get("key", "")) for i in items] if items else [(k, k) for k in data]
    for key, rel in chosen:
        if key not in data:
            if optional:
                continue
            raise ConfigError(f"MountVolume.SetUp failed: key {key} not in {what}", reason="ContainerCreating")
        path = target / safe_relative(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[key])


def materialize_volume(volume: Mapping[str, Any], pod: Pod, pod_dir: Path, pvc_root: Path,
                       sources: Sources, facts: PodFacts) -> Path:
    """Create one volume's local directory and content; return where it lives."""
    name = volume.get("name", "")
    target = pod_dir / "volumes" / name
    namespace = pod_key(pod)[0]
    if "hostPath" in volume:
        return Path(volume["hostPath"].get("path", "/"))
    if "persistentVolumeClaim" in volume:
        claim = pvc_root / namespace / volume["persistentVolumeClaim"].get("claimName", name)
        claim.mkdir(parents=True, exist_ok=True)
        return claim
    if "configMap" in volume:
        cm = volume["configMap"]
        write_key_files(target, sources.get(("configmap", cm.get("name", ""))), cm.get("items"),
                        bool(cm.get("optional")), f'configmap "{cm.get("name", "")}"')
    elif "secret" in volume:
        sec = volume["secret"]
        write_key_files(target, sources.get(("secret", sec.get("secretName", ""))), sec.get("items"),
                        bool(sec.get("optional")), f'secret "{sec.get("secretName", "")}"')
    elif "downwardAPI" in volume:
        target.mkdir(parents=True, exist_ok=True)
        for item in volume["downwardAPI"].get("items") or []:
            if "fieldRef" in item:
                path = target / safe_relative(item.get("path", ""))
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(field_ref_value(pod, item["fieldRef"].get("fieldPath", ""), facts))
    else:
        if "emptyDir" not in volume:
            log.warning("pod %s/%s: volume %r of an unsupported kind is an empty directory", *pod_key(pod), name)
        target.mkdir(parents=True, exist_ok=True)
    return target


def materialize_volumes(pod: Pod, pod_dir: Path, pvc_root: Path, sources: Sources, facts: PodFacts) -> dict[str, Path]:
    """All of the pod's volumes, by name."""
    return {v.get("name", ""): materialize_volume(v, pod, pod_dir, pvc_root, sources, facts)
            for v in spec(pod).get("volumes") or []}


def mount_paths(container: Mapping[str, Any], volumes: Mapping[str, Path]) -> dict[str, Path]:
    """mountPath -> local path, for each volumeMount (with subPath)."""
    mounts: dict[str, Path] = {}
    for mount in container.get("volumeMounts") or []:
        name = mount.get("name", "")
        if name not in volumes:
            raise ConfigError(f"volumeMount {name!r} names no volume of the pod")
        local = volumes[name]
        if mount.get("subPath"):
            local = local / safe_relative(mount["subPath"])
        mounts[mount.get("mountPath", "")] = local
    return mounts
