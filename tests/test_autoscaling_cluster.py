"""The grid on a local autoscaling Ray cluster, as on a cloud one: Ray's fake multi-node provider with
cluster.yaml's own worker node type (``gpu_worker``: 48 CPUs, 4 GPUs, here logical, at min_workers 0, at
most 2) beside a 1-CPU head, and a real ``mlflow server`` over HTTP, both started by
``grid/local_cluster.py`` (the script docs/clusters.md gives users).

A small grid whose preset asks for a GPU per training node runs with ``--ray-address auto``. It keeps the
GPU requests (it reads the node types from --cluster-config), so the autoscaler launches GPU workers;
every training node runs on one, as Ray Train workers. The two students ask for a whole worker each, so
two workers run; once the ablation student has checkpointed an epoch, the test kills the raylet of the Ray
node it runs on (a lost machine): Train restarts its worker group on the other node once that is free, the
student resumes from its checkpoint, and the grid ends with exactly one FINISHED MLflow run per node.

Worker "nodes" are extra raylets on this machine with logical GPUs (no CUDA: training runs on the CPU
device with gloo). Ray's fake provider never learns that a node it launched died (its nodes stay
"uninitialized" to the autoscaler), so no replacement is launched: the rest of the grid runs on the
surviving worker. The test skips rather than disturb a Ray cluster that already runs here.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from grid.local_cluster import (
    RAY, autoscaling_cluster, fake_cluster_config, grid_command, kill_ray_node, mlflow_server, ray_is_running,
    token_env,
)
from conftest import new_mlflow_store
from test_grid_e2e import TINY

pytestmark = [pytest.mark.slow, pytest.mark.ray_cluster]  # runs after or before, never beside, the other clusters

#: Every training node asks for a whole worker (4 GPUs), so the two students need two workers; they train
#: long enough (8 epochs, each reported to Ray Train with a checkpoint) to lose one. One triplet margin:
#: 7 nodes.
PRESET = {
    **TINY, "name": "tiny-gpu", "controls": False,  # the cluster is under test, not the method
    "stage_defaults": {**TINY["stage_defaults"], "student": {**TINY["stage_defaults"]["student"], "epochs": 8},
                       "triplet_kd": {**TINY["stage_defaults"]["triplet_kd"], "margin": [0.1]}},
    "resources": {**{a: {"cpus": 1, "gpus": 4} for a in ("vggf", "vggface", "resnet50")},
                  "fusion": {"cpus": 1}, "significance": {"cpus": 1}},
}


def ray_json(*args: str) -> list[dict]:
    out = subprocess.run([RAY, *args, "--format", "json"], capture_output=True, text=True, env=token_env(), timeout=120)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip().startswith("[") else []


def kill_the_ablation_students_node(storage: Path, grid: subprocess.Popen, timeout: float = 300) -> str:
    """Once the ablation student (the second of the two students to start, each asking for a whole GPU
    worker, so both workers are up) has checkpointed an epoch, SIGKILL the raylet of the Ray node it runs
    on, which its placement.json names."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and grid.poll() is None:
        for placement in storage.glob("nodes/*/placement.json"):
            directory, running = placement.parent, json.loads(placement.read_text())
            if (running["node"].endswith("/student_ablation") and (directory / "train" / "last.pt").exists()
                    and not (directory / "result.json").exists() and kill_ray_node(running["ray_node"])):
                return running["ray_node"]
        time.sleep(0.2)
    raise AssertionError("the ablation student never trained as a Ray Train worker while the test watched")


def test_gpu_workers_launch_on_demand_train_through_ray_train_and_survive_a_lost_node(tmp_path: Path, fresh_home: Path):
    """From a new account's empty HOME: the cluster makes its own Ray token (mode 600) and never prints it."""
    if ray_is_running():
        pytest.skip("a Ray cluster already runs on this machine; not disturbing it")
    (tmp_path / "tiny-gpu.yaml").write_text(yaml.safe_dump(PRESET))
    storage = tmp_path / "runs"
    new_mlflow_store(tmp_path / "mlflow.db")  # the tracking server's store
    with autoscaling_cluster(fake_cluster_config(), tmp_path) as config, mlflow_server(tmp_path) as uri:
        command = grid_command(config, uri, storage, ["--tasks", "gender", "--archs", "vggf",
                                                      "--preset", str(tmp_path / "tiny-gpu.yaml")])
        with open(tmp_path / "grid.log", "w") as log:
            grid = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=token_env())
            killed = kill_the_ablation_students_node(storage, grid)
            assert grid.wait(timeout=600) == 0, (tmp_path / "grid.log").read_text()[-4000:]
        nodes = ray_json("list", "nodes")
        # The tracking server's own store, read through its HTTP API.
        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("occkd-tiny-gpu").experiment_id], max_results=100)

    out = (tmp_path / "grid.log").read_text()
    token = fresh_home / ".ray" / "auth_token"
    assert token.stat().st_mode & 0o777 == 0o600 and token.read_text() not in out
    assert "running on Ray: 1 CPUs, 0 GPUs (the autoscaler may grow it to 97 CPUs, 8 GPUs)" in out
    assert "training nodes run as Ray Train workers" in out
    gpu_nodes = {n["node_id"] for n in nodes if n["resources_total"].get("GPU", 0) > 0}
    assert killed in gpu_nodes and len(gpu_nodes) == 2, "the autoscaler did not launch a GPU worker per student"

    node_runs = [r for r in runs if "occkd.node" in r.data.tags]
    # One run per node, every one FINISHED: the lost node left no FAILED or duplicate run behind.
    assert len(node_runs) == 7 and len({r.data.tags["occkd.node"] for r in node_runs}) == 7
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    training = [r for r in node_runs if r.data.tags["occkd.strategy"] not in ("fusion", "significance")]
    assert len(training) == 5
    for run in training:  # each on a launched GPU worker, with a GPU of its own, through Ray Train
        assert run.data.tags["occkd.ray_node"] in gpu_nodes, run.info.run_name
        assert run.data.tags["occkd.gpu_ids"] == "0,1,2,3" and run.data.tags["occkd.workers"] == "1"
        assert run.data.tags["occkd.ray_train"] == "True" and run.data.tags["occkd.device"] == "cpu"
        # Why one worker: the driver's record (the rule's inputs, or the preset's count where it waited for room)
        assert re.fullmatch(r"1 \((its chain .*|the preset's)\)", run.data.tags["occkd.workers_choice"]), run.data.tags
    # The student on the lost node: Train restarted its worker group on the other node, from the epoch it had
    # checkpointed, and it trained all its epochs. (The teacher may name the lost node: it finished there.)
    resumed = [r for r in training if "occkd.resumed_from_epoch" in r.data.tags]
    assert [r.info.run_name for r in resumed] == ["gender/vggf/student_ablation"]
    assert int(resumed[0].data.tags["occkd.resumed_from_epoch"]) >= 1
    assert resumed[0].data.tags["occkd.ray_node"] != killed
    assert all(r.data.tags["occkd.ray_node"] != killed for r in training if r.data.tags["occkd.strategy"] != "teacher")
    assert json.loads((storage / "nodes" / resumed[0].data.tags["occkd.node"] / "placement.json").read_text())[
        "ray_node"] == resumed[0].data.tags["occkd.ray_node"]
    result = json.loads((storage / "nodes" / resumed[0].data.tags["occkd.node"] / "result.json").read_text())
    assert result["epochs_run"] == 8 and result["placement"]["resumed_from_epoch"] >= 1
