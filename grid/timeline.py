"""Where a grid's wall time goes: one row per node run by this invocation, and the per-node overhead.

Times are wall-clock seconds since the grid started. For each node:

* ``ready``: the searcher handed it to Tune: its parents were done and a slot was free;
* ``started``: its trial function began (after Ray placed and started the trial's process);
* ``first_step`` / ``last_step``: its first and last optimiser steps (training nodes);
* ``finished``: its outputs were sealed; ``completed``: the driver saw the trial end.

Three overheads, all Ray/Tune and set-up cost rather than training:

* **start**: ``first_step − ready`` of a training node (trial start, imports, data, model, parents);
* **handoff**: ``child.started − parent.last_step`` (a fusion parent: ``finished``) for each node and the
  parent whose completion released it: the parent's evaluation and sealing, the driver's bookkeeping
  and MLflow records, and the child's trial start. A child that then waited more than
  :data:`SLOT_WAIT_S` for a free slot is left out of the median (queueing, not overhead) and counted;
* **turnover**: ``next.started − node.last_step`` (or ``finished``), where ``next`` is the first node
  handed out after this one completed: the time the freed slot stood idle. On a busy machine most
  children wait for a slot while other ready nodes take it, so this counts every slot change.
"""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any, Mapping

from grid.graph import StageGraph
from grid.results import NodeResult

#: A child handed out this long after its last parent completed waited for a slot.
SLOT_WAIT_S = 1.0

COLUMNS = ("key", "kind", "ready", "started", "first_step", "last_step", "finished", "completed")


def node_timeline(graph: StageGraph, results: Mapping[str, NodeResult], ready_at: Mapping[str, float],
                  completed_at: Mapping[str, float], origin: float) -> list[dict[str, Any]]:
    """Rows for the nodes this invocation ran (those in ``ready_at``), in the order they were handed out."""
    rows = []
    for key in sorted(ready_at, key=ready_at.get):
        result = results.get(key)  # None: the node failed or was stopped
        started, finished = (result.timing.started_at, result.timing.finished_at) if result else (None, None)
        first_step, last_step = result.timing.steps if result else (None, None)
        row: dict[str, Any] = {"key": key, "kind": graph.nodes[key].kind}
        for column, value in (("ready", ready_at.get(key)), ("started", started), ("first_step", first_step),
                              ("last_step", last_step), ("finished", finished), ("completed", completed_at.get(key))):
            row[column] = None if value is None else round(value - origin, 3)
        rows.append(row)
    return rows


def overheads(graph: StageGraph, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Start and handoff overheads per node (see the module docstring) and their medians."""
    by_key = {row["key"]: row for row in rows}
    start = {row["key"]: row["first_step"] - row["ready"] for row in rows
             if row["first_step"] is not None and row["ready"] is not None}
    handoff: dict[str, float] = {}
    waited = 0
    for row in rows:
        parents = [by_key[p] for p in graph.nodes[row["key"]].parent_keys if p in by_key]
        parents = [p for p in parents if p["completed"] is not None]
        if not parents or row["started"] is None:
            continue
        releaser = max(parents, key=lambda p: p["completed"])
        end = releaser["last_step"] if releaser["last_step"] is not None else releaser["finished"]
        if end is None:
            continue
        if row["ready"] - releaser["completed"] > SLOT_WAIT_S:
            waited += 1
            continue
        handoff[row["key"]] = row["started"] - end
    turnover: dict[str, float] = {}
    queue = [row for row in rows if row["ready"] is not None and row["started"] is not None]  # hand-out order
    for row in sorted((r for r in rows if r["completed"] is not None), key=lambda r: r["completed"]):
        end = row["last_step"] if row["last_step"] is not None else row["finished"]
        successor = next((r for r in queue if r["ready"] >= row["completed"]), None)
        if successor is None or end is None:
            continue
        queue.remove(successor)
        turnover[row["key"]] = successor["started"] - end
    return {
        "start": start, "handoff": handoff, "waited_for_slot": waited, "turnover": turnover,
        "median_start": statistics.median(start.values()) if start else None,
        "median_handoff": statistics.median(handoff.values()) if handoff else None,
        "median_turnover": statistics.median(turnover.values()) if turnover else None,
    }


def write_timeline(rows: list[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_timeline(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as handle:
        return [{k: (v if k in ("key", "kind") else (float(v) if v else None)) for k, v in row.items()}
                for row in csv.DictReader(handle)]


def summary_line(stats: Mapping[str, Any]) -> str:
    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f} s"

    return (f"per-node overhead, median: ready -> first step {fmt(stats['median_start'])} "
            f"({len(stats['start'])} training nodes); last step -> child start {fmt(stats['median_handoff'])} "
            f"({len(stats['handoff'])} handoffs, {stats['waited_for_slot']} more waited for a slot); "
            f"last step -> next node start {fmt(stats['median_turnover'])} ({len(stats['turnover'])} slot changes)")
