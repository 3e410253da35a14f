"""The grid's timeline: per-node overheads from known times."""

from __future__ import annotations

from pathlib import Path

import pytest

from grid.graph import Edge, Node, Resources, StageGraph
from grid.results import FusionNodeResult, Timing, TrainNodeResult, TrainTiming
from grid.timeline import node_timeline, overheads, read_timeline, write_timeline


def _node(key: str, kind: str, parents: tuple[str, ...]) -> Node:
    return Node(key=key, kind=kind, task="gender", arch="vggf", stage=key, train_faces="full", seed=0,
                params={}, parents=tuple(Edge(parent, parent) for parent in parents), resources=Resources(), cost=1.0)


GRAPH = StageGraph(nodes={
    "teacher": _node("teacher", "train", ()),
    "student": _node("student", "train", ("teacher",)),
    "ablation": _node("ablation", "train", ("teacher",)),
    "fusion": _node("fusion", "fusion", ("teacher", "student")),
})
ORIGIN = 1000.0
READY = {"teacher": 1000.5, "student": 1021.0, "ablation": 1024.0, "fusion": 1032.0}
COMPLETED = {"teacher": 1020.5, "student": 1031.6, "ablation": 1035.0, "fusion": 1040.0}


def _train(key: str, started: float, first_step: float, last_step: float, finished: float) -> TrainNodeResult:
    return TrainNodeResult(key=key, hash=key, stage=key, metrics={}, scores=(), val_score=0.0, best_epoch=1,
                           epochs_run=1, max_epochs=1, seconds=finished - started, history=(), placement={},
                           timing=TrainTiming(started_at=started, first_step_at=first_step, last_step_at=last_step,
                                              finished_at=finished))


RESULTS = {
    "teacher": _train("teacher", 1002.0, 1004.5, 1018.0, 1020.0),
    "student": _train("student", 1022.0, 1024.0, 1030.0, 1031.0),
    "ablation": _train("ablation", 1025.0, 1026.5, 1034.0, 1034.5),
    "fusion": FusionNodeResult(key="fusion", hash="fusion", stage="fusion", metrics={}, scores=(), val_score=0.0,
                               fitted={}, selected={}, seconds=6.5,
                               timing=Timing(started_at=1033.0, finished_at=1039.5)),
}


def test_overheads_from_known_times(tmp_path: Path) -> None:
    rows = node_timeline(GRAPH, RESULTS, READY, COMPLETED, origin=ORIGIN)
    assert [r["key"] for r in rows] == ["teacher", "student", "ablation", "fusion"]  # in hand-out order
    assert rows[0] == {"key": "teacher", "kind": "train", "ready": 0.5, "started": 2.0, "first_step": 4.5,
                       "last_step": 18.0, "finished": 20.0, "completed": 20.5}
    stats = overheads(GRAPH, rows)
    # ready -> first step: 4.0, 3.0, 2.5 s; the fusion node has no steps.
    assert stats["start"] == pytest.approx({"teacher": 4.0, "student": 3.0, "ablation": 2.5})
    assert stats["median_start"] == pytest.approx(3.0)
    # student: released by the teacher (last step 18.0) and started at 22.0 -> 4.0 s. The ablation was
    # handed out 3.5 s after the teacher completed: it waited for a slot and is left out. Fusion: released
    # by the student (completed after the teacher), last step 30.0, started at 33.0 -> 3.0 s.
    assert stats["handoff"] == pytest.approx({"student": 4.0, "fusion": 3.0})
    assert stats["waited_for_slot"] == 1
    assert stats["median_handoff"] == pytest.approx(3.5)
    # Slot turnover: the teacher completed at 20.5 and the student (handed out at 21.0, started 22.0) took
    # its slot: 22.0 - 18.0; the student completed at 31.6 and fusion (ready 32.0, started 33.0) followed:
    # 33.0 - 30.0. Nothing was handed out after the ablation or fusion completed.
    assert stats["turnover"] == pytest.approx({"teacher": 4.0, "student": 3.0})
    assert stats["median_turnover"] == pytest.approx(3.5)
    path = write_timeline(rows, tmp_path / "timeline.csv")
    assert read_timeline(path) == rows
