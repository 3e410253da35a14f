"""Which code a grid runs: the folder its packages are imported from, and a fingerprint of their source.

Ray workers import ``occkd_core`` and ``grid`` themselves. With the project installed from one checkout and
``grid/run_all.py`` run from another, they imported the installed one while MLflow recorded the other's
commit. The driver therefore starts its own Ray with its code folder first on the workers' PYTHONPATH, and
every trial (and Ray Train worker) checks that it imports code with the driver's fingerprint, refusing in
one line when it does not (on a cluster, where the nodes' code is the user's to install).
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

#: The folder holding the imported ``occkd_core`` and ``grid`` packages (a checkout, or site-packages).
CODE_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("occkd_core", "grid")
SOURCE_SUFFIXES = (".py", ".yaml", ".json")


@lru_cache(maxsize=None)
def code_fingerprint(root: Path = CODE_ROOT) -> str:
    """sha256 over the packages' source files under ``root`` (relative path and bytes, in sorted order): equal
    for the same code wherever it lives, different for any edit, committed or not."""
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts:
                digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def prefer_this_code_in_workers() -> None:
    """Put :data:`CODE_ROOT` first on PYTHONPATH, which a local Ray's workers inherit from the driver."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(CODE_ROOT)]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(CODE_ROOT), *rest])


def check_same_code(expected: str, where: str) -> None:
    """Refuse to run a node with code other than the driver's (``expected``: its :func:`code_fingerprint`)."""
    found = code_fingerprint()
    if expected and found != expected:
        raise RuntimeError(f"{where} imports occkd from {CODE_ROOT} (code {found}), not the driver's code (code "
                           f"{expected}): install the same checkout on every node, or submit with "
                           f"`ray job submit --working-dir .`")


__all__ = ["CODE_ROOT", "check_same_code", "code_fingerprint", "prefer_this_code_in_workers"]
