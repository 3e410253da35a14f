"""slurm/occkd.sbatch on a real one-node Slurm (Debian's slurm-wlm, brought up by slurm/local_slurm.sh with 4
fake GPUs): while another job holds GPUs 0 and 1, a job given GPUs 2 and 3 runs the tiny grid end to end, and
Ray hands its nodes those two and no other; the same submission again retrains nothing; scancel of a running job leaves no MLflow run RUNNING and no Ray process.

It needs root (Slurm's daemons, the fake GPU devices) and `apt-get install -y slurm-wlm munge`; without
them it is skipped. It takes several minutes, so it is marked ``slurm`` and left out of the default run:
``python -m pytest -m slurm tests/test_slurm.py``."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from grid.local_cluster import gpu_preset

REPO = Path(__file__).resolve().parents[1]
GRID = ["--tasks", "gender", "--archs", "vggf"]  # 10 nodes (smoke: 2 triplet margins, 2 teacher-free controls)

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.ray_cluster,
    pytest.mark.slow,  # minutes; and `-m "not slow"` on the command line replaces addopts' `-m 'not slurm'`
    pytest.mark.skipif(not all(shutil.which(t) for t in ("sbatch", "slurmctld", "slurmd", "munged")),
                       reason="no Slurm here (apt-get install -y slurm-wlm munge)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a local Slurm's daemons run as root"),
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory) -> dict[str, str]:
    state = tmp_path_factory.mktemp("slurm")
    # 4 CPUs on a 2-core machine: room for the GPU-holding job beside the grid's 2. The jobs run from a new
    # account's empty HOME (no Ray token): occkd.sbatch makes the token and hands it to its Ray steps.
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "HOME": str(home), "FAKE_GPUS": "4", "SLURM_CPUS": "4", "SLURMCTLD_PORT": "6917"}
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(name, None)
    subprocess.run([str(REPO / "slurm" / "local_slurm.sh"), "start", str(state)], env=env, check=True,
                   timeout=120, capture_output=True, text=True)
    env["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run(["scancel", "--user", "root"], env=env, timeout=30)
        subprocess.run([str(REPO / "slurm" / "local_slurm.sh"), "stop", str(state)], env=env, timeout=60)


def submit(env: dict[str, str], out: Path, *grid: str) -> str:
    """sbatch from the checkout (the script's OCCKD_HOME) with 2 GPUs and 2 CPUs; returns the job id."""
    job_env = {**env, "OCCKD_DIR": str(out), "OCCKD_PYTHON": sys.executable}
    out.mkdir(parents=True, exist_ok=True)  # Slurm opens the job's log there before the script runs
    done = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=2", "--cpus-per-task=2",
                           f"--output={out}/job-%j.out", "slurm/occkd.sbatch", *GRID, *grid],
                          cwd=REPO, env=job_env, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip().split(";")[0]


def job_state(env: dict[str, str], job: str) -> str:
    """The job's state as squeue shows it, or "" once it has left the queue."""
    done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_log(out: Path, job: str) -> str:
    path = out / f"job-{job}.out"
    return path.read_text() if path.exists() else ""


def ray_processes(port: int) -> list[str]:
    """Processes of the Ray cluster on ``port`` (its GCS port appears in every one's command line)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if re.search(rf"[:=]{port}\b", line) and re.search(r"ray|raylet|gcs_server", line):
            found.append(line[:160])
    return found


def head_port(log: str) -> int:
    match = re.search(r"Ray head [\d.]+:(\d+)", log)
    assert match, log[-3000:]
    return int(match.group(1))


def runs(out: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], max_results=1000) if found else []


def test_a_job_uses_exactly_its_gpus_and_a_resubmission_retrains_nothing(slurm, tmp_path: Path):
    out = tmp_path / "shared"
    # The smoke preset with each training node asking for a GPU (1 CPU each), so Ray hands GPUs out.
    preset = gpu_preset("smoke", 1, tmp_path)
    experiment = "occkd-smoke-local-gpu"
    holder = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=2", "--cpus-per-task=1", "--output=/dev/null",
                             "--wrap", "sleep 3000"], env=slurm, capture_output=True, text=True, timeout=60,
                            check=True).stdout.strip()
    try:
        wait_until(lambda: job_state(slurm, holder) == "RUNNING", 60, "the job holding GPUs 0 and 1")
        job = submit(slurm, out, "--preset", str(preset))
        wait_until(lambda: job_state(slurm, job) == "", 900, f"job {job} to end")
    finally:
        subprocess.run(["scancel", holder], env=slurm, timeout=30)
    log = job_log(out, job)
    assert "occkd: the grid exited 0" in log, log[-3000:]
    token = Path(slurm["HOME"]) / ".ray" / "auth_token"  # made by the job, said where, never printed
    assert f"Ray token: made {token} (mode 600)" in log and token.read_text() not in log, log[-3000:]
    assert token.stat().st_mode & 0o777 == 0o600
    assert "running on Ray: 2 CPUs, 2 GPUs" in log, log[-3000:]  # the node has 4
    assert "10 nodes: 0 already complete, 10 to run" in log, log[-3000:]
    assert (out / "occkd_runs" / "reports" / experiment / "report.md").is_file(), log[-3000:]
    recorded = runs(out, experiment)
    nodes = [r for r in recorded if "occkd.node" in r.data.tags]
    assert len(nodes) == 10 and all(r.info.status == "FINISHED" for r in recorded), log[-3000:]
    # Ray handed the training nodes the job's GPUs, 2 and 3, never the other job's 0 and 1.
    gpu_ids = [r.data.tags["occkd.gpu_ids"] for r in nodes if r.data.tags.get("occkd.gpu_ids", "-") != "-"]
    assert len(gpu_ids) == 8 and {i for ids in gpu_ids for i in ids.split(",")} <= {"2", "3"}, gpu_ids
    assert not ray_processes(head_port(log))  # Ray went down with the job
    current = Path("/tmp/ray/ray_current_cluster")  # and a bare ray.init() will not look for it
    assert not (current.exists() and current.read_text().strip().endswith(f":{head_port(log)}"))
    checkpoints = {p: p.stat().st_mtime_ns for p in (out / "occkd_runs" / "nodes").glob("*/train/best.pt")}
    assert len(checkpoints) == 8

    # The same submission again: every node is found complete, nothing trains, nothing is recorded twice.
    again = submit(slurm, out, "--preset", str(preset))
    wait_until(lambda: job_state(slurm, again) == "", 600, f"job {again} to end")
    log = job_log(out, again)
    assert "10 nodes: 10 already complete, 0 to run" in log and "occkd: the grid exited 0" in log, log[-3000:]
    assert f"Ray token: {token}\n" in log  # the same token again, not a new one
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints
    assert len([r for r in runs(out, experiment) if "occkd.node" in r.data.tags]) == 10
    assert not ray_processes(head_port(log))


def test_scancel_leaves_no_run_running_and_no_ray_behind(slurm, tmp_path: Path):
    out = tmp_path / "shared"
    job = submit(slurm, out)
    wait_until(lambda: "started     gender/vggf/teacher" in job_log(out, job), 600, "the teacher to start")
    wait_until(lambda: any(r.info.status == "RUNNING" and r.info.run_name == "gender/vggf/teacher"
                           for r in runs(out, "occkd-smoke")), 120, "the teacher's MLflow run")
    port = head_port(job_log(out, job))
    assert ray_processes(port)
    subprocess.run(["scancel", job], env=slurm, check=True, timeout=30)
    wait_until(lambda: job_state(slurm, job) == "", 120, f"job {job} to leave the queue after scancel")
    recorded = runs(out, "occkd-smoke")
    assert recorded and not [r.info.run_name for r in recorded if r.info.status == "RUNNING"], job_log(out, job)[-3000:]
    teacher = next(r for r in recorded if r.info.run_name == "gender/vggf/teacher")
    assert teacher.info.status == "KILLED"
    wait_until(lambda: not ray_processes(port), 30, "Ray's processes to end")
