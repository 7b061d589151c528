"""Files generated from code (the CRD, dashboards, alert rules): write them, or check that the committed ones match."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path


def write_or_check(files: Mapping[Path, str], *, check: bool, regenerate: str, stale: Iterable[Path] = (),
                   source: str = "") -> int:
    """With `check`: write nothing, exit 1 naming each missing, differing or `stale` file; else write them all."""
    if not check:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
        return 0
    problems = []
    for path, text in files.items():
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current != text:
            problems.append(f"{path} {'is missing' if current is None else 'is out of date' + source}")
    problems += [f"{p} is not generated (a file whose source no longer exists?)" for p in stale]
    if problems:
        print("\n".join(problems) + f"\nregenerate: {regenerate}", file=sys.stderr)
        return 1
    print(f"{next(iter(files))} is up to date" if len(files) == 1 else f"{len(files)} generated files are up to date")
    return 0
