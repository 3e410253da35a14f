"""Faults: crashing workers are retried, a node that fails for good blocks only its descendants,
a killed driver loses nothing and records nothing twice. Real local Ray, real MLflow store."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import new_mlflow_store
from test_grid_e2e import TINY

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
NODE_KEYS = {"gender/vggf/teacher", "gender/vggf/student", "gender/vggf/student_ablation", "gender/vggf/standard_kd",
             "gender/vggf/triplet_kd[margin=0.1]", "gender/vggf/triplet_kd[margin=0.3]", "gender/vggf/fusion",
             "gender/significance"}


def command(workdir: Path) -> list[str]:
    return [sys.executable, str(REPO / "grid" / "run_all.py"), "--tasks", "gender", "--archs", "vggf",
            "--preset", str(workdir / "tiny.yaml")]


def run_grid(workdir: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(workdir), cwd=workdir, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def node_runs(workdir: Path):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("occkd-tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return [r for r in runs if "occkd.node" in r.data.tags], runs


def make_workdir(tmp_path: Path) -> Path:
    # Faults are under test, not the method: no teacher-free controls, two nodes fewer.
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "controls": False}))
    new_mlflow_store(tmp_path / "mlflow.db")
    return tmp_path


def test_a_crashing_worker_is_retried_and_a_node_failing_for_good_blocks_only_its_descendants(tmp_path: Path):
    """One grid, two faults: the student's worker crashes once (Tune retries it, in the same MLflow run) and
    a triplet node fails on every attempt (its descendants are blocked, every other node completes). Once
    the cause is gone, the same command finishes the grid, training only what is missing."""
    workdir = make_workdir(tmp_path)
    faults = json.dumps([{"node": "gender/vggf/student", "times": 1},
                         {"node": "gender/vggf/triplet_kd[margin=0.1]", "times": 99}])
    result = run_grid(workdir, OCCKD_FAULT_INJECTION=faults)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "FAILED  gender/vggf/triplet_kd[margin=0.1]: RuntimeError: injected fault" in result.stderr
    assert "BLOCKED gender/vggf/fusion: parent gender/vggf/triplet_kd[margin=0.1] failed" in result.stderr
    assert "BLOCKED gender/significance" in result.stderr
    runs, all_runs = node_runs(workdir)
    student = [r for r in runs if r.info.run_name == "gender/vggf/student"]
    assert [r.info.status for r in student] == ["FINISHED"]  # the retry reused the node's run
    tags = student[0].data.tags  # ... and says it was retried, and why
    assert tags["occkd.retries"] == "1" and "injected fault" in tags["occkd.retry.1"]
    status = {r.info.run_name: r.info.status for r in runs}
    assert status["gender/vggf/triplet_kd[margin=0.1]"] == "FAILED"
    for done in ("gender/vggf/teacher", "gender/vggf/student", "gender/vggf/student_ablation",
                 "gender/vggf/standard_kd", "gender/vggf/triplet_kd[margin=0.3]"):
        assert status[done] == "FINISHED"
    assert "gender/vggf/fusion" not in status  # blocked nodes never start
    assert all(r.info.status != "RUNNING" for r in all_runs)
    again = run_grid(workdir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "5 already complete, 3 to run" in again.stdout
    runs, _ = node_runs(workdir)
    assert {r.info.run_name for r in runs if r.info.status == "FINISHED"} == NODE_KEYS


# Killed mid-graph, several nodes sealed. A driver killed mid-teacher is tests/test_interrupts.py's third
# driver (a second Ctrl-C exits at once), which its rerun resumes.
@pytest.mark.parametrize("kill_after", [30.0])
def test_a_killed_driver_loses_nothing_and_records_nothing_twice(tmp_path: Path, kill_after: float):
    workdir = make_workdir(tmp_path)
    driver = subprocess.Popen(command(workdir), cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    time.sleep(kill_after)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started, at once
    driver.wait()
    time.sleep(2)
    sealed_before = {p.parent.name for p in (workdir / "occkd_runs").glob("nodes/*/result.json")}
    again = run_grid(workdir)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"{len(sealed_before)} already complete" in again.stdout  # finished nodes are not retrained
    runs, all_runs = node_runs(workdir)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(r.info.run_name for r in finished) == sorted(NODE_KEYS)  # exactly one FINISHED run per node
    assert all(r.info.status in ("FINISHED", "FAILED") for r in all_runs)  # nothing left RUNNING
