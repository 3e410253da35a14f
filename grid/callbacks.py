"""Driver-side Tune callback: MLflow records and the progress view follow the trials."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Callable

from ray import tune

from grid.artifacts import ARTIFACTS, node_dir, read_result
from grid.graph import Node, StageGraph
from grid.progress import Progress
from grid.results import NodeResult, ResultFormatError
from grid.tracking import Tracker


class GridCallback(tune.Callback):
    def __init__(self, graph: StageGraph, tracker: Tracker, progress: Progress, storage: Path,
                 results: dict[str, NodeResult], failed: dict[str, str], interrupts: Any = None,
                 workers_note: Callable[[str], str | None] = lambda key: None) -> None:
        self.graph, self.tracker, self.progress = graph, tracker, progress
        # Why a node got its DDP workers (grid.searcher.DependencySearcher.workers_note): the driver's own record.
        self.workers_note = workers_note
        self.storage, self.results, self.failed = storage, results, failed
        self.interrupts = interrupts  # grid.interrupts.Interrupts: set once the driver got SIGINT / SIGTERM
        self.interrupted: list[str] = []  # nodes stopped by it
        self.retries: dict[str, int] = {}  # node key -> how many times Tune has run it again

    def _node(self, trial) -> Node:
        return self.graph.nodes[trial.config["node"]["key"]]

    def on_trial_start(self, iteration, trials, trial, **info):
        node = self._node(trial)
        self.tracker.start_node(node, workers_choice=self.workers_note(node.key))
        self.progress.set_state(node.key, "running")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("event") == "epoch":
            node = self._node(trial)
            self.tracker.log_epoch(node, result)
            self.progress.epoch(node.key, result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        node = self._node(trial)
        directory = node_dir(self.storage, node.hash)
        try:
            result = read_result(directory)
        except ResultFormatError as err:  # sealed by this code, so a bug: the node fails and says why
            self.failed[node.key] = str(err)
            self.tracker.fail_node(node, self.failed[node.key])
            self.progress.set_state(node.key, "failed")
            return
        if result is None and self.interrupts is not None and self.interrupts.signum is not None:
            self.interrupted.append(node.key)  # stopped by Ctrl-C / SIGTERM: KILLED, resumed by the rerun
            self.tracker.kill_node(node, f"interrupted by {signal.Signals(self.interrupts.signum).name}")
            self.progress.set_state(node.key, "interrupted")
            return
        if result is None:
            self.failed[node.key] = "the node finished without sealing its outputs"
            self.tracker.fail_node(node, self.failed[node.key])
            self.progress.set_state(node.key, "failed")
            return
        self.results[node.key] = result
        self.tracker.finish_node(node, result, directory, ARTIFACTS[node.kind])
        self.progress.set_state(node.key, "done")

    def on_trial_recover(self, iteration, trials, trial, **info):
        """The node's trial failed (a crash, a lost worker) and Tune runs it again: its run keeps a record."""
        node = self._node(trial)
        self.retries[node.key] = self.retries.get(node.key, 0) + 1
        self.tracker.note_retry(node, self.retries[node.key], error_text(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        node = self._node(trial)
        reason = error_text(trial)
        self.failed[node.key] = reason
        self.tracker.fail_node(node, reason)
        self.progress.set_state(node.key, "failed")
        for child in self.graph.descendants(node.key):
            self.progress.set_state(child, "blocked")


def error_text(trial) -> str:
    """The last line of the trial's error (the exception), not Ray's whole traceback."""
    try:
        text = Path(trial.error_file).read_text() if trial.error_file else ""
    except OSError:
        text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "the node's trial errored"
