"""The grid's progress: on a terminal a compact live view (nodes done/running/pending per stage, latest
metrics, elapsed, ETA) redrawn in place; anywhere else (a log file, CI, ``ray job submit``) one line per
node event (started, done, failed, blocked, interrupted), never a repeated status line.

The ETA divides the remaining estimated work (the graph's cost model) by the rate at which work has
been finishing in this invocation; it is a rough guide until a few nodes have finished.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Mapping, TextIO

from grid.graph import StageGraph, node_order



def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, graph: StageGraph, skipped: set[str], stream: TextIO = sys.stdout,
                 min_interval: float = 2.0) -> None:
        self.graph = graph
        self.state = {key: ("skipped" if key in skipped else "pending") for key in graph.nodes}
        self.stream = stream
        self.min_interval = min_interval
        self.started = time.monotonic()
        self.last_print = 0.0
        self.latest: dict[str, str] = {}  # node key -> short metric text
        self.done_cost = 0.0
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.lines_drawn = 0  # on a terminal the view redraws in place; in a log it appends
        self.total_cost = sum(n.cost for k, n in graph.nodes.items() if k not in skipped)
        self.to_run = len(graph.nodes) - len(skipped)

    def set_state(self, key: str, state: str) -> None:
        previous = self.state.get(key)
        self.state[key] = state
        last = self.latest.get(key, "")
        if state == "done" and previous != "done":
            self.done_cost += self.graph.nodes[key].cost
            self.latest.pop(key, None)
        if not self.tty:
            if state != previous:
                self.event_line(key, state, last)
            return
        self.render(force=state in ("done", "failed", "blocked"))

    def epoch(self, key: str, metrics: Mapping[str, float]) -> None:
        shown = [f"ep {int(metrics.get('epoch', 0))}"]
        for name in ("val_accuracy", "val_mae", "train_loss"):
            if name in metrics:
                shown.append(f"{name} {metrics[name]:.3g}")
        self.latest[key] = " ".join(shown)
        if self.tty:  # a log gets the node's events, not every epoch of every node
            self.render()

    def event_line(self, key: str, state: str, last_epoch: str = "") -> None:
        """One line of a log: time, event, node, its last epoch's metrics when it ends, nodes done, ETA."""
        ended = sum(s in ("done", "failed", "blocked", "interrupted") for k, s in self.state.items()
                    if s != "skipped")
        elapsed = time.monotonic() - self.started
        rate = self.done_cost / elapsed if elapsed > 0 else 0.0
        eta = _clock((self.total_cost - self.done_cost) / rate) if rate > 0 else "?"
        event = {"running": "started"}.get(state, state)
        detail = f"  ({last_epoch})" if last_epoch and state != "running" else ""
        self.stream.write(f"[{_clock(elapsed)}] {event:<11} {key}{detail}  [{ended}/{self.to_run} nodes ended, "
                          f"ETA {eta}]\n")
        self.stream.flush()

    def summary_line(self) -> str:
        parts = []
        for stage in node_order():
            keys = [k for k, n in self.graph.nodes.items() if n.stage == stage]
            if not keys:
                continue
            done = sum(self.state[k] in ("done", "skipped") for k in keys)
            running = sum(self.state[k] == "running" for k in keys)
            bad = sum(self.state[k] in ("failed", "blocked") for k in keys)
            text = f"{stage} {done}/{len(keys)}"
            if running:
                text += f" ({running} running)"
            if bad:
                text += f" ({bad} failed/blocked)"
            parts.append(text)
        elapsed = time.monotonic() - self.started
        rate = self.done_cost / elapsed if elapsed > 0 else 0.0
        eta = (self.total_cost - self.done_cost) / rate if rate > 0 else float("nan")
        eta_text = _clock(eta) if eta == eta else "?"
        return f"[{_clock(elapsed)} elapsed, ETA {eta_text}] " + " | ".join(parts)

    def render(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_print < self.min_interval:
            return
        self.last_print = now
        lines = [self.summary_line()]
        for key, text in list(self.latest.items())[:4]:
            if self.state.get(key) == "running":
                lines.append(f"    {key}: {text}")
        if self.tty and self.lines_drawn:
            self.stream.write(f"\x1b[{self.lines_drawn}F\x1b[J")  # back to the view's first line, clear below
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()
        self.lines_drawn = len(lines)


def quiet_ray_environment() -> None:
    """Keep Ray's own log noise out of the user's way (set before ``import ray`` starts workers)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "0")
