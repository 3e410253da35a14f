"""Test-only fault hooks, read from ``OCCKD_FAULT_*`` environment variables; a grid run without them
behaves as if this module did not exist.

- ``OCCKD_FAULT_INJECTION='{"node": KEY, "times": N}'`` (or a JSON list of them): the node's first N
  attempts raise, as a crashing worker would. The driver reads it (:func:`fault_injection`) and hands it
  to every trial in ``RunSettings.fault_injection``; the trial raises (:func:`maybe_inject_fault`).
- ``OCCKD_FAULT_UPLOAD_DELAY='{"node": KEY, "seconds": S}'``: the driver's MLflow upload of that node
  takes S seconds longer (:func:`upload_delay`, :func:`hold_upload`).

Imported on the driver and in Ray trials alike, so it imports neither Ray nor MLflow.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

from grid.artifacts import StorageLayout
from grid.graph import Node

FAULT_INJECTION_ENV = "OCCKD_FAULT_INJECTION"
UPLOAD_DELAY_ENV = "OCCKD_FAULT_UPLOAD_DELAY"


def fault_injection() -> dict[str, int] | None:
    """Tests inject worker crashes through OCCKD_FAULT_INJECTION='{"node": KEY, "times": N}' (or a JSON list
    of them): the node's first N attempts raise, as a crashing worker would."""
    text = os.environ.get(FAULT_INJECTION_ENV)
    if not text:
        return None
    faults = json.loads(text)
    return {f["node"]: int(f.get("times", 1)) for f in ([faults] if isinstance(faults, dict) else faults)}


def maybe_inject_fault(node: Node, settings: Mapping[str, Any], storage: Path) -> None:
    """Tests only: fail this node's first ``times`` attempts, counted in a file on storage. The setting maps
    node keys to their ``times``."""
    times = (settings.get("fault_injection") or {}).get(node.key)
    if times is None:
        return
    counter = StorageLayout(storage).fault_injection / f"{node.hash}.json"
    counter.parent.mkdir(parents=True, exist_ok=True)
    attempts = json.loads(counter.read_text())["attempts"] if counter.exists() else 0
    counter.write_text(json.dumps({"attempts": attempts + 1}))
    if attempts < int(times):
        raise RuntimeError(f"injected fault in {node.key} (attempt {attempts + 1})")


def upload_delay() -> dict[str, Any]:
    """Tests hold a node's uploads back with OCCKD_FAULT_UPLOAD_DELAY='{"node": KEY, "seconds": S}'."""
    text = os.environ.get(UPLOAD_DELAY_ENV)
    return json.loads(text) if text else {}


def hold_upload(delay: Mapping[str, Any], node_key: str) -> None:
    """Tests: an upload of ``node_key`` that takes as long as :func:`upload_delay` says."""
    if delay.get("node") == node_key:
        time.sleep(float(delay["seconds"]))
