"""The tracking store failing under a running grid (issue 28): a real `mlflow server` killed with SIGKILL
mid-grid, and Ctrl-C while the last records drain. Real local Ray, real server and store, real signals."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from grid.local_cluster import MLFLOW, free_port, mlflow_server
from conftest import new_mlflow_store
from test_grid_e2e import TINY

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
NODES = 8  # gender × vggf of TINY without controls


def make_workdir(tmp_path: Path) -> Path:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "controls": False}))
    new_mlflow_store(tmp_path / "mlflow.db")
    return tmp_path


def grid_command(workdir: Path, tracking_uri: str) -> list[str]:
    return [sys.executable, str(REPO / "grid" / "run_all.py"), "--tasks", "gender", "--archs", "vggf",
            "--preset", str(workdir / "tiny.yaml"), "--tracking-uri", tracking_uri]


def start_grid(workdir: Path, tracking_uri: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(grid_command(workdir, tracking_uri), cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


def read_until(process: subprocess.Popen, needle: str, timeout: float = 600) -> list[str]:
    """The grid's stdout lines up to the first holding ``needle``."""
    lines, deadline = [], time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if needle in line:
            return lines
        assert time.monotonic() < deadline, f"no {needle!r} within {timeout} s:\n{''.join(lines[-30:])}"
    raise AssertionError(f"the grid ended before {needle!r}:\n{''.join(lines[-30:])}{process.stderr.read()[-3000:]}")


def start_server(workdir: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--artifacts-destination",
         str(workdir / "mlartifacts")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)


def one_finished_run_per_node(workdir: Path) -> list:
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("occkd-tiny")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    finished = [r for r in runs if "occkd.node" in r.data.tags and r.info.status == "FINISHED"]
    assert len(finished) == NODES and len({r.data.tags["occkd.node"] for r in finished}) == NODES
    return runs


def test_a_tracking_server_killed_mid_grid_neither_freezes_nor_fails_the_grid(tmp_path: Path):
    """Before: the driver sat ~4 minutes in MLflow's HTTP retries inside the epoch callback, then a 270-line
    traceback, exit 1, a node torn down unsealed and runs left RUNNING. Now the nodes after the kill train and
    seal, one line says the store does not answer, the exit is 1 with the count of unrecorded nodes, and a
    rerun once the server is back records them without training anything."""
    workdir = make_workdir(tmp_path)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server(workdir, port)
    try:
        grid = start_grid(workdir, uri)
        read_until(grid, "gender/vggf/student ")  # a progress line of the student: it started
        read_until(grid, "done")  # ... and the next node to end (the student, or the ablation beside it)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        out, err = grid.communicate(timeout=900)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert grid.returncode == 1, out[-3000:] + err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.count("is not answering") == 1, err
    assert "not recorded in MLflow" in err and "rerun the same command once the store answers" in err
    sealed = [json.loads(p.read_text()) for p in (workdir / "occkd_runs" / "nodes").glob("*/result.json")]
    assert len(sealed) == NODES  # every node trained and sealed though the store was gone
    assert (workdir / "occkd_runs" / "reports" / "occkd-tiny" / "report.md").is_file()

    with mlflow_server(workdir, port=port, store_uri=f"sqlite:///{workdir / 'mlflow.db'}"):
        again = subprocess.run(grid_command(workdir, uri), cwd=workdir, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"{NODES} nodes: {NODES} already complete, 0 to run" in again.stdout
    one_finished_run_per_node(workdir)


def test_ctrl_c_while_the_last_records_drain_leaves_at_once_and_closes_the_runs(tmp_path: Path):
    """Before: "stopped before any node ran" (false), the upload waited out (~2 min) with the 20 s deadline
    cancelled, the parent left RUNNING. Now: exit 130 within seconds, the truth said, every run closed; the
    rerun records what was left, training nothing."""
    workdir = make_workdir(tmp_path)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    grid = start_grid(workdir, uri, OCCKD_FAULT_UPLOAD_DELAY=json.dumps({"node": "gender/significance",
                                                                        "seconds": 300}))
    read_until(grid, "waiting for")  # the report is written; the records drain
    grid.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    out, err = grid.communicate(timeout=120)
    assert grid.returncode == 130, out[-3000:] + err[-3000:]
    assert time.monotonic() - signalled < 30  # not the upload's 300 s, nor past the 20 s deadline
    assert "stopped before any node ran" not in err and "Traceback" not in err, err
    assert f"{NODES} of the grid's {NODES} nodes are sealed on storage" in err
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("occkd-tiny").experiment_id], max_results=1000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    significance = [r for r in runs if r.data.tags.get("occkd.strategy") == "significance"]
    assert [r.info.status for r in significance] == ["KILLED"]

    again = subprocess.run(grid_command(workdir, uri), cwd=workdir, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"{NODES} nodes: {NODES} already complete, 0 to run" in again.stdout
    one_finished_run_per_node(workdir)
