"""Real signals to a real driver, and two real drivers on one storage (issue 14): a second grid on the same
storage stops at once naming the first; Ctrl-C and SIGTERM stop the nodes, record them KILLED, write no
report and exit 130 / 143; a second Ctrl-C exits at once; the rerun resumes and finishes."""

from __future__ import annotations

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

#: The teacher trains long enough to be interrupted mid-node, three times (each epoch, ~0.1 s here, is a
#: checkpoint to resume from).
TEACHER_EPOCHS = 300
PRESET = {**TINY, "name": "tiny-long", "controls": False,  # signals are under test, not the method
          "stage_defaults": {**TINY["stage_defaults"],
                             "teacher": {**TINY["stage_defaults"]["teacher"], "epochs": TEACHER_EPOCHS}},
          "resources": {a: {"cpus": 1} for a in ("vggf", "vggface", "resnet50", "fusion", "significance")}}


def command(workdir: Path) -> list[str]:
    return [sys.executable, str(REPO / "grid" / "run_all.py"), "--tasks", "gender", "--archs", "vggf",
            "--preset", str(workdir / "tiny-long.yaml")]


def start(workdir: Path, name: str) -> subprocess.Popen:
    log = open(workdir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command(workdir), cwd=workdir, stdout=log, stderr=subprocess.STDOUT)


def teacher_epochs(workdir: Path) -> int:
    """Epochs the teacher has checkpointed (its progress.json-free view: the MLflow-independent last.pt)."""
    import torch

    for last in (workdir / "occkd_runs").glob("nodes/*/train/last.pt"):
        try:
            state = torch.load(last, map_location="cpu", weights_only=False)
        except Exception:  # noqa: BLE001 - being written
            continue
        if state.get("stage_spec", {}).get("strategy") == "teacher":
            return int(state.get("epoch", 0))
    return 0


def wait_for(predicate, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the driver exited ({process.returncode}) before {what}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def runs(workdir: Path):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("occkd-tiny-long")
    return client.search_runs([experiment.experiment_id], max_results=1000)


@pytest.mark.slow
def test_a_second_driver_ctrl_c_sigterm_and_the_rerun(tmp_path: Path, fresh_home: Path):
    (tmp_path / "tiny-long.yaml").write_text(yaml.safe_dump(PRESET))
    new_mlflow_store(tmp_path / "mlflow.db")
    first = start(tmp_path, "first")
    wait_for(lambda: teacher_epochs(tmp_path) >= 1, 180, "the teacher's first epoch", first)

    # A second grid on the same storage: refused at once, naming the running one; nothing of it runs.
    second = subprocess.run(command(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stdout + second.stderr
    errors = [line for line in second.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "another grid is running on --storage" in errors[0] and f"pid {first.pid}" in errors[0]

    # Ctrl-C: the nodes stop within seconds, KILLED in MLflow, no report, exit 130.
    first.send_signal(signal.SIGINT)
    sent = time.monotonic()
    assert first.wait(timeout=60) == 130
    assert time.monotonic() - sent < 30
    log = (tmp_path / "first.log").read_text()
    assert "interrupted by SIGINT" in log and "Rerun the same command to resume" in log
    assert not (tmp_path / "occkd_runs" / "reports").exists()
    recorded = runs(tmp_path)
    assert not [r for r in recorded if r.info.status == "RUNNING"]
    parent = next(r for r in recorded if r.data.tags.get("occkd.kind") == "grid")
    assert parent.info.status == "KILLED"
    teacher = next(r for r in recorded if r.info.run_name == "gender/vggf/teacher")
    assert teacher.info.status == "KILLED" and teacher.data.tags["occkd.closed_reason"] == "interrupted by SIGINT"
    interrupted_at = teacher_epochs(tmp_path)

    # SIGTERM (a scheduler's or `kill`'s): the same, exit 143, no crash dump from Ray's handler.
    again = start(tmp_path, "again")
    wait_for(lambda: teacher_epochs(tmp_path) > interrupted_at, 180, "the teacher to resume and train on", again)
    again.send_signal(signal.SIGTERM)
    assert again.wait(timeout=60) == 143
    log = (tmp_path / "again.log").read_text()
    assert "interrupted by SIGTERM" in log and "SIGTERM received at time" not in log

    # A second Ctrl-C exits at once, without waiting for the nodes.
    terminated_at = teacher_epochs(tmp_path)
    third = start(tmp_path, "third")
    wait_for(lambda: teacher_epochs(tmp_path) > terminated_at, 180, "the third driver to train", third)
    third.send_signal(signal.SIGINT)
    time.sleep(0.5)
    third.send_signal(signal.SIGINT)
    sent = time.monotonic()
    assert third.wait(timeout=30) == 130
    assert time.monotonic() - sent < 10

    # The rerun resumes and finishes: one FINISHED run per node, the teacher resumed, not restarted.
    final = subprocess.run(command(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    recorded = runs(tmp_path)
    finished = [r for r in recorded if r.info.status == "FINISHED" and "occkd.node" in r.data.tags]
    assert len(finished) == len({r.data.tags["occkd.node"] for r in finished}) == 8
    assert not [r for r in recorded if r.info.status == "RUNNING"]
    teacher = next(r for r in finished if r.info.run_name == "gender/vggf/teacher")
    steps = [m.step for m in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(
        teacher.info.run_id, "train_loss")]
    assert steps and min(steps) > 1 and max(steps) == TEACHER_EPOCHS  # resumed from its checkpoint, not retrained


HUNG_DRIVER = """
import os, signal, sys, time
from pathlib import Path
from grid.interrupts import Interrupts

interrupts = Interrupts()
interrupts.install()
interrupts.in_experiment = True
interrupts.on_overdue = lambda: Path(sys.argv[1]).write_text("closed")
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(60)  # a driver stuck on a Ray that is gone
"""


@pytest.mark.slow
def test_a_driver_that_cannot_stop_closes_its_runs_at_the_deadline_and_exits(tmp_path: Path, fresh_home: Path):
    """scancel signals Ray's processes with the driver: a driver stuck on them must still close its runs
    before Slurm's KillWait, so after OCCKD_STOP_GRACE_S it runs its closing action and exits 143."""
    marker = tmp_path / "closed"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", HUNG_DRIVER, str(marker)], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "OCCKD_STOP_GRACE_S": "2"})
    assert done.returncode == 143, done.stderr
    assert marker.read_text() == "closed"
    assert 2 <= time.monotonic() - started < 30
    assert "did not stop within 2 s" in done.stderr
    # A deadline that is not a number of seconds stops the grid before it starts, saying so.
    bad = subprocess.run([sys.executable, str(REPO / "grid" / "run_all.py"), "--tasks", "gender"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OCCKD_STOP_GRACE_S": "soon"})
    assert bad.returncode == 2 and "OCCKD_STOP_GRACE_S must be a number of seconds > 0, got 'soon'" in bad.stderr
    assert not (tmp_path / "occkd_runs").exists()


def test_tune_can_checkpoint_the_stopper_after_the_first_signal():
    """Tune JSON-encodes its stopper into every experiment checkpoint (cloudpickle for what JSON cannot
    hold). After a first Ctrl-C the stopper holds the deadline's timer and the driver's closing action
    (its tracker, with locks): encoding them raised inside ``Tuner.fit`` and the driver crashed instead of
    stopping (CI, stop 33: exit -11 where 130 was due). Tune must be able to save it, and what it saves
    still says a signal came."""
    import json
    import threading

    from ray.tune.utils.serialization import TuneFunctionDecoder, TuneFunctionEncoder

    from grid.interrupts import Interrupts

    interrupts = Interrupts(grace_s=3600)
    busy = threading.Lock()  # stands for the tracker's locks and threads
    interrupts.on_overdue = lambda: busy.acquire()
    interrupts.in_experiment = True
    try:
        interrupts._handle(signal.SIGINT, None)  # the first signal: asks Tune to stop, starts the deadline
        saved = json.dumps({"runner_data": {"_stopper": interrupts}}, cls=TuneFunctionEncoder)
    finally:
        interrupts.restore()
    restored = json.loads(saved, cls=TuneFunctionDecoder, allow_cloudpickle=True)["runner_data"]["_stopper"]
    assert restored.signum == signal.SIGINT and restored.stop_all() and restored("trial", {})
    assert restored.grace_s == 3600 and restored.on_overdue is None
