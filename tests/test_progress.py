"""The progress view in a log (not a terminal): one line per node event, none per epoch."""

import io

from grid.graph import expand_graph
from grid.progress import Progress
from occkd_core.presets import load_preset


def test_a_log_gets_one_line_per_node_event_and_none_per_epoch():
    graph = expand_graph(load_preset("smoke"), ["gender"], ["vggf"], train_sizes={"gender": 100},
                         data_fingerprints={"gender": "d"})
    log = io.StringIO()  # not a terminal, like a file, CI or `ray job submit`
    progress = Progress(graph, skipped={"gender/vggf/teacher"}, stream=log, min_interval=0.0)
    progress.set_state("gender/vggf/student", "running")
    for epoch in range(1, 6):
        progress.epoch("gender/vggf/student", {"epoch": epoch, "val_accuracy": 0.5 + epoch / 100})
    progress.set_state("gender/vggf/student", "done")
    progress.set_state("gender/vggf/standard_kd", "running")
    progress.set_state("gender/vggf/standard_kd", "failed")
    progress.set_state("gender/vggf/fusion", "blocked")
    lines = log.getvalue().splitlines()
    assert len(lines) == 5, lines  # student started, done; standard_kd started, failed; fusion blocked
    assert "started" in lines[0] and "gender/vggf/student" in lines[0]
    assert "done" in lines[1] and "(ep 5 val_accuracy 0.55)" in lines[1]
    assert f"[1/{len(graph.nodes) - 1} nodes ended" in lines[1]
    assert [line.split()[1:3] for line in lines[2:]] == [
        ["started", "gender/vggf/standard_kd"], ["failed", "gender/vggf/standard_kd"], ["blocked", "gender/vggf/fusion"]]
