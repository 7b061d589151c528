"""CustomResourceDefinitions: creating one serves its versions; deleting one removes its objects."""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import kmock
import yaml

from .errors import invalid
from .objects import Obj, meta
from .resources import ALL_VERBS, CRD_RESOURCE, Target


def validate_crd(crd: Obj) -> None:
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    name = meta(crd).get("name", "")
    if not spec.get("group") or not names.get("plural") or not names.get("kind") or not spec.get("versions"):
        raise invalid("CustomResourceDefinition", name, "spec", "Required value: group, names.plural, "
                                                                 "names.kind and versions are required")
    if name != f"{names['plural']}.{spec['group']}":
        raise invalid("CustomResourceDefinition", name, "metadata.name",
                       f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group')


def _crd_resources(crd: Obj) -> dict[kmock.resource, tuple[kmock.ResourceInfo, list[Obj]]]:
    """The resources a CRD serves, with their discovery info and printer columns."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    result = {}
    for version in spec.get("versions") or []:
        if not version.get("served", True):
            continue
        subresources = {"status"} if "status" in (version.get("subresources") or {}) else set()
        info = kmock.ResourceInfo(
            kind=names["kind"], singular=names.get("singular") or names["kind"].lower(),
            namespaced=spec.get("scope", "Namespaced") == "Namespaced", verbs=ALL_VERBS,
            shortnames=names.get("shortNames") or (), categories=names.get("categories") or (),
            subresources=subresources)
        result[kmock.resource(spec["group"], version["name"], names["plural"])] = (
            info, list(version.get("additionalPrinterColumns") or []))
    return result



def load_crds(paths: Iterable[str | pathlib.Path]) -> list[Obj]:
    """The CustomResourceDefinition documents in YAML files (other documents are skipped)."""
    crds = []
    for path in paths:
        for doc in yaml.safe_load_all(pathlib.Path(path).read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                crds.append(doc)
    return crds



class CrdMixin:
    """The emulator's CRD registration (``register_crd``) and (un)declaration on writes."""

    # -- CRDs ----------------------------------------------------------------------------------

    async def register_crd(self, crd: Mapping[str, Any]) -> Obj:
        """Create (or, if it exists, replace) a CustomResourceDefinition from a dict, as the API would."""
        t = Target(CRD_RESOURCE, self.resources[CRD_RESOURCE], None, meta(crd).get("name"), None)
        async with self._lock:
            current = self._get(t.key) if t.name else None
            if current is None:
                return await self._create(t, copy.deepcopy(dict(crd)))
            candidate = {**copy.deepcopy(dict(crd)), "metadata": {**meta(crd), "resourceVersion": None}}
            return await self._update(t, current, candidate)

    def _declare_crd(self, crd: Obj, old: Obj | None) -> None:
        """Serve the CRD's versions (and stop serving versions it no longer has)."""
        declared = _crd_resources(crd)
        for res in set(_crd_resources(old) if old else {}) - set(declared):
            self.resources.pop(res, None)
            self._columns.pop(res, None)
        for res, (info, columns) in declared.items():
            self.resources[res] = info
            self._columns[res] = columns

    async def _undeclare_crd(self, crd: Obj) -> None:
        """Remove the CRD's objects (DELETED events) and stop serving its versions."""
        for res in _crd_resources(crd):
            for key, obj in list(self._live(res)):
                await self._remove(key, obj)
            self.resources.pop(res, None)
            self._columns.pop(res, None)

    # -- tables and openapi --------------------------------------------------------------------
