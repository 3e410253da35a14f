"""What the driver leaves when the experiment ends: the report, this invocation's timeline, the parent
run's end and the exit summary; or, after SIGINT / SIGTERM, the runs closed as KILLED and what to do next."""

from __future__ import annotations

import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from grid.figures import write_figures
from grid.graph import StageGraph
from grid.progress import Progress
from grid.report import collect_rows, write_report
from grid.results import NodeResult
from grid.artifacts import StorageLayout
from grid.spec import GridSpec
from grid.timeline import node_timeline, overheads, summary_line, write_timeline
from grid.weights import describe_init
from occkd_core.files import atomic_write_bytes


@dataclass
class RayOutcome:
    """What running the remaining nodes on Ray left behind, for the report and the exit status."""

    graph: StageGraph  # with the resources the cluster could give
    failed: dict[str, str] = field(default_factory=dict)  # node key -> reason
    blocked: dict[str, str] = field(default_factory=dict)  # node key -> the failed ancestor
    ready_at: dict[str, float] = field(default_factory=dict)  # node key -> handed to Tune (wall clock)
    completed_at: dict[str, float] = field(default_factory=dict)
    started_at: float = 0.0
    interrupted: int | None = None  # the signal that stopped the experiment, if one did


def leave_interrupted(spec: GridSpec, signum: int, tracker: Any, graph: StageGraph,
                      results: Mapping[str, NodeResult]) -> int:
    """A signal while no node trains (before the experiment, or after it while MLflow records drain): the
    records still queued are left to the next run, the runs this invocation left open end KILLED now, and
    the user learns what is done. Exit status: the shell's for the signal."""
    from grid.interrupts import exit_status

    name = signal.Signals(signum).name
    left = tracker.recorder.pending()[0]
    closed = tracker.kill_open_runs(f"interrupted by {name}")
    sealed = sum(key in results for key in graph.nodes)
    print(f"\ninterrupted by {name}: {sealed} of the grid's {len(graph.nodes)} nodes are sealed on storage"
          + (f"; {left} MLflow record(s) not yet written are left to the next run" if left else "")
          + (f" ({closed} run(s) closed as KILLED)" if closed else "")
          + ". Rerun the same command to go on (sealed nodes are kept and recorded, nothing is trained twice).",
          file=sys.stderr)
    return exit_status(signum)


def write_interrupted(spec: GridSpec, outcome: "RayOutcome", results: Mapping[str, NodeResult], tracker: Any,
                      to_run: list[str]) -> int:
    """After SIGINT / SIGTERM: every node run this invocation left open and the parent end as KILLED, the
    report stays as the last complete invocation wrote it, and the user learns what stopped and how to go
    on. The exit status is the shell's for the signal."""
    import signal

    from grid.interrupts import exit_status

    name = signal.Signals(outcome.interrupted).name
    stopped = sorted(k for k in tracker.started if k not in results and k not in outcome.failed)
    for key in stopped:
        tracker.kill_node(outcome.graph.nodes[key], f"interrupted by {name}")
    tracker.finish("KILLED")
    tracker.drain(lambda text: print(text + " (a second Ctrl-C leaves them to the next run)", file=sys.stderr))
    sealed = [k for k in to_run if k in results]
    print(f"\ninterrupted by {name}: {len(sealed)} of the {len(to_run)} nodes to run were sealed"
          + (f"; stopped: {', '.join(stopped)}" if stopped else "")
          + ". No report written. Rerun the same command to resume (sealed nodes are kept, training nodes "
          "resume from their last epoch).", file=sys.stderr)
    return exit_status(outcome.interrupted)


def write_outputs(spec: GridSpec, outcome: RayOutcome, results: Mapping[str, NodeResult], tracker: Any,
                  progress: Progress, started: float) -> int:
    """The report, the timeline of this invocation, the parent run's status and the exit summary."""
    graph = outcome.graph
    report_dir = StorageLayout(spec.storage).report(spec.experiment)
    setting = (f"Preset `{spec.preset.name}`: {spec.preset.description} Data: "
               f"{spec.data_root or 'built-in synthetic faces'}. Seeds: {spec.seeds}. "
               + describe_init(graph, spec.preset, spec.from_scratch))
    rows = collect_rows(graph, results)
    figures = write_figures(rows, graph, results, report_dir)
    paths = write_report(rows, report_dir, title="occkd report", setting=setting, figures=figures)
    if outcome.ready_at:  # where this invocation's wall time went, node by node
        timeline = node_timeline(graph, results, outcome.ready_at, outcome.completed_at, origin=outcome.started_at)
        paths.append(write_timeline(timeline, report_dir / "timeline.csv"))
        stats = overheads(graph, timeline)
        paths.append(atomic_write_bytes(report_dir / "overheads.json", json.dumps(stats, indent=1).encode()))
        print(summary_line(stats))
    failed, blocked = outcome.failed, outcome.blocked
    upload_errors = tracker.drain(print)
    tracker.finish("FAILED" if failed or blocked or upload_errors or tracker.unrecorded() else "FINISHED",
                   artifacts=paths, figures=[path for _, path in figures],
                   note=parent_note(spec, graph, tracker, paths[0]))
    upload_errors = tracker.drain()
    unrecorded = tracker.unrecorded()
    print(progress.summary_line())
    print(f"report: {paths[0]}  (CSV: {paths[1]}; {len(figures)} figures); {time.monotonic() - started:.0f} s")
    print(mlflow_lines(spec.tracking_uri, tracker.link))
    for key, error in upload_errors.items():
        print(f"  MLflow upload of {key} failed ({error}); its outputs are sealed on storage and the next run "
              f"records them again", file=sys.stderr)
    if unrecorded:
        from grid.records import describe_unrecorded

        print(describe_unrecorded(unrecorded, spec.tracking_uri), file=sys.stderr)
    if (upload_errors or unrecorded) and not (failed or blocked):
        return 1  # every node sealed, but MLflow lacks some of them until the next run
    if failed or blocked:
        print(f"\n{len(failed)} node(s) failed, {len(blocked)} blocked:", file=sys.stderr)
        for key, reason in failed.items():
            print(f"  FAILED  {key}: {reason}", file=sys.stderr)
        for key, parent in blocked.items():
            print(f"  BLOCKED {key}: parent {parent} failed", file=sys.stderr)
        return 1
    return 0


def mlflow_lines(tracking_uri: str, link: str) -> str:
    """How to open the runs table: the link (MLflow's model-training view), and for a local store the
    command that serves it."""
    from grid.tracking import ui_command

    command = ui_command(tracking_uri)
    return (f"MLflow runs table: {link}" + (f"\n  (serve it first: {command})" if command else ""))


def parent_note(spec: GridSpec, graph: StageGraph, tracker: Any, report: Path) -> str:
    """The parent run's description in the MLflow UI: what the grid is, where its runs and report are."""
    return (f"**occkd grid** `{graph.identity}`: {len(graph.nodes)} nodes, tasks {', '.join(spec.tasks)}, "
            f"architectures {', '.join(spec.archs)}, preset `{spec.preset.name}`, seeds {spec.seeds}.\n\n"
            f"[Runs table]({tracker.link}) · report `{report}` (also under this run's artifacts, with its figures "
            f"in `figures/`) · invocations so far: {tracker.invocation} (tags `occkd.invocation.N`).")
