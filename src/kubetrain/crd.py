"""Generate the TrainingJob CustomResourceDefinition from the pydantic models in `kubetrain.api`.

The models are the single source of truth; this module only translates their JSON Schema (draft
2020-12, as pydantic writes it) into the *structural* OpenAPI v3 subset that apiextensions.k8s.io/v1
accepts: no $ref, no anyOf/oneOf, a `type` on every node, OpenAPI 3.0 `nullable` and boolean
`exclusiveMinimum`. Anything the translation does not know raises, so a new kind of field in
api.py fails here loudly instead of producing a CRD that the API server rejects or misreads.

    python -m kubetrain.crd [PATH]           # write the CRD (default crds/trainingjob.yaml)
    python -m kubetrain.crd --check [PATH]   # exit 1 if PATH is not what the models generate
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from kubetrain.api import (
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    TrainingJobSpec,
    TrainingJobStatus,
)
from kubetrain.generated import write_or_check

DEFAULT_PATH = "crds/trainingjob.yaml"
HEADER = (
    "# GENERATED from src/kubetrain/api.py by kubetrain.crd -- do not edit by hand.\n"
    f"# Regenerate: python -m kubetrain.crd {DEFAULT_PATH}\n"
    "# A regex pattern cannot be folded:\n"
    "# yamllint disable rule:line-length\n"
)

# Keywords kept, in the order they are written (stable, readable diffs of the generated file).
# Kubernetes reads them as JSON Schema does, except the exclusive bounds (flags in OpenAPI 3.0).
_KEPT = (
    "description", "enum", "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum",
    "minLength", "maxLength", "pattern", "minItems", "maxItems", "maxProperties", "default", "required",
)  # fmt: skip
_BOUND_OF = {"exclusiveMinimum": "minimum", "exclusiveMaximum": "maximum"}
# Keywords translated below, or dropped: titles are class names, $defs are inlined.
_TRANSLATED = {"type", "properties", "items", "additionalProperties", "title", "$defs"}
_NULL = {"type": "null"}
SCALARS = {"boolean", "integer", "number", "string"}


def structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Translate one pydantic JSON-Schema node (and its subtree) into a structural schema node."""
    if "$ref" in node:
        # Kubernetes has no references: inline the definition; the siblings pydantic writes next to
        # a $ref (description, default) describe the field and win over the definition's own.
        target = defs[node["$ref"].removeprefix("#/$defs/")]
        return structural({**target, **{k: v for k, v in node.items() if k != "$ref"}}, defs)

    if "anyOf" in node:
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        branches = [b for b in node["anyOf"] if b != _NULL]
        if len(branches) < len(node["anyOf"]):  # X | None
            inner = branches[0] if len(branches) == 1 else {"anyOf": branches}
            out = structural({**inner, **rest}, defs)
            if "type" not in out and out.get("x-kubernetes-preserve-unknown-fields"):
                return out  # any value, null included
            out["nullable"] = True
            if "enum" in out:
                # The API server checks `enum` even for null values, so null must be listed to be
                # accepted (null enum members are exempt from its type check of enum values).
                out["enum"] = [*out["enum"], None]
            return out
        if sorted(b.get("type", "") for b in branches) == ["integer", "string"]:  # int | str
            # A Kubernetes quantity ("4Gi" or 4): the one union structural schemas allow, untyped.
            out = structural({**rest, "type": "string"}, defs)
            del out["type"]
            return {"x-kubernetes-int-or-string": True, **out}
        if {b.get("type") for b in branches} <= SCALARS:  # bool | int | float | str: any scalar
            # Structural schemas have no scalar union: the API server keeps the value as written, and the
            # operator's validation (the same models) refuses anything but a scalar, naming the field.
            described = {k: v for k, v in rest.items() if k == "description"}
            return {"x-kubernetes-preserve-unknown-fields": True, **described}
        raise ValueError(f"no structural equivalent for anyOf {node['anyOf']}")

    unknown = set(node) - _TRANSLATED - set(_KEPT)
    if unknown:
        raise ValueError(f"unsupported JSON Schema keywords {sorted(unknown)} in {node}")

    out: dict[str, Any] = {}
    if "type" in node:
        out["type"] = node["type"]
    elif "enum" in node and all(isinstance(v, str) for v in node["enum"]):
        out["type"] = "string"  # a Literal pydantic left untyped
    else:
        raise ValueError(f"no type for {node}: structural schemas need one on every node")
    for key in _KEPT:
        value = node.get(key)
        if value is None:  # absent, or `default: null`, which only restates "optional"
            continue
        if key in _BOUND_OF:  # JSON Schema 2020: the bound itself; OpenAPI 3.0: a flag on it
            out[_BOUND_OF[key]], value = value, True
        out[key] = value
    if "properties" in node:
        out["properties"] = {k: structural(v, defs) for k, v in node["properties"].items()}
    if "items" in node:
        out["items"] = structural(node["items"], defs)
    extra = node.get("additionalProperties")
    if extra is True:  # dict[str, Any]: free-form, keep what the user wrote
        out["x-kubernetes-preserve-unknown-fields"] = True
    elif isinstance(extra, dict):  # dict[str, X]
        out["additionalProperties"] = structural(extra, defs)
    # `additionalProperties: false` (extra="forbid") is dropped: Kubernetes forbids it next to
    # `properties` and prunes unknown fields instead; the models still reject them.
    return out


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural schema of a pydantic model, camelCase as on the wire."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return structural(schema, schema.get("$defs", {}))


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition (apiextensions.k8s.io/v1) for TrainingJob."""
    root = {
        "type": "object",
        "description": f"{KIND}: a distributed fine-tuning run (torchrun over `nodes` pods).",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": model_schema(TrainingJobSpec),
            "status": model_schema(TrainingJobStatus),
        },
    }

    def column(name: str, type_: str, path: str) -> dict[str, str]:
        return {"name": name, "type": type_, "jsonPath": path}

    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["all"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        column("Phase", "string", ".status.phase"),
                        column("Nodes", "integer", ".spec.nodes"),
                        column("Step", "integer", ".status.step"),
                        column("Progress", "string", ".status.progress.percent"),
                        column("ETA", "string", ".status.progress.eta"),
                        column("Restarts", "integer", ".status.restarts"),
                        column("Output", "string", ".status.output.uri"),
                        column("Age", "date", ".metadata.creationTimestamp"),
                    ],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def crd_yaml() -> str:
    """The CRD as YAML, byte-for-byte stable (the committed file is compared against it)."""
    body = yaml.safe_dump(build_crd(), sort_keys=False, width=100, allow_unicode=True)
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetrain.crd", description="Generate the TrainingJob CRD from kubetrain.api."
    )
    parser.add_argument("path", nargs="?", default=DEFAULT_PATH, help=f"default: {DEFAULT_PATH}")
    parser.add_argument("--check", action="store_true", help="fail if PATH is out of date; write nothing")
    args = parser.parse_args(argv)
    return write_or_check({Path(args.path): crd_yaml()}, check=args.check, source=" with src/kubetrain/api.py",
                          regenerate=f"python -m kubetrain.crd {args.path}")

if __name__ == "__main__":
    sys.exit(main())
