"""Where the shipped configs and example data are: in a source checkout, or inside an installed package.

The repository keeps `configs/` and `data/examples.json` at its top level; a wheel carries them as package
data under `textbind/_resources/` (see setup.py). Code and configs name them by their checkout-relative
paths (`configs/toy/model.yaml`); `find_resource` finds such a path from any working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGED_ROOT = Path(__file__).resolve().parent / "_resources"
CHECKOUT_ROOT = Path(__file__).resolve().parents[1]


def _roots() -> list[Path]:
    roots = []
    if (CHECKOUT_ROOT / "pyproject.toml").is_file():  # a source checkout (or an editable install of one)
        roots.append(CHECKOUT_ROOT)
    roots.append(PACKAGED_ROOT)
    return roots


def find_resource(path: str | os.PathLike) -> Path | None:
    """`path` as given when it exists (from the working directory), else the same relative path in the source
    checkout or in the installed package; None when none of them holds it."""
    candidate = Path(path)
    if candidate.exists():
        return candidate
    if candidate.is_absolute():
        return None
    for root in _roots():
        if (root / candidate).exists():
            return root / candidate
    return None


def resolve_resource(path: str) -> str:
    """`find_resource` as a string, or `path` unchanged when nothing holds it (the caller reports it missing)."""
    found = find_resource(path) if path else None
    return str(found) if found is not None else path
