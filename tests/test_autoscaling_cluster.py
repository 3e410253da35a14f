"""GPU requests reach the autoscaler: a local autoscaling Ray cluster (Ray's fake multi-node provider: a
CPU head with 1 CPU, GPU worker types at min_workers 0) runs a small grid whose preset asks for a GPU
per training node. The grid keeps the requests (it reads the node types from --cluster-config), the
autoscaler launches GPU workers for them, every training node runs on one with a GPU assigned, and the
grid finishes with one FINISHED MLflow run per node.

Worker "nodes" are extra raylets on this machine with logical GPUs (no CUDA: training runs on the CPU
device). The provider needs ``disable_node_updaters`` (its nodes cannot be re-tagged, so the updater
would mark every launch failed) and its workers dial the GCS on port 6379. The test skips rather than
disturb a Ray cluster that already runs here, and stops its own at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from test_grid_e2e import TINY

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray") if (Path(sys.executable).parent / "ray").exists() else "ray"

#: The local cluster: a head that can run fusion and statistics but no training, and up to two workers
#: of 1 CPU and 2 GPUs each, launched on demand.
CLUSTER = {
    "cluster_name": "occkd-test", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
    "provider": {"type": "fake_multinode", "disable_node_updaters": True, "disable_launch_config_check": True},
    "auth": {"ssh_user": "ubuntu"},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        "gpu_worker": {"resources": {"CPU": 1, "GPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2},
    },
    "head_node_type": "ray.head.default",
    **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                           "setup_commands", "head_setup_commands", "worker_setup_commands",
                           "head_start_ray_commands", "worker_start_ray_commands")},
    "file_mounts": {}, "file_mounts_sync_continuously": False,
}


@pytest.fixture
def autoscaling_cluster(tmp_path: Path):
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    if subprocess.run([RAY, "status"], capture_output=True, env=env, timeout=60).returncode == 0:
        pytest.skip("a Ray cluster already runs on this machine; not disturbing it")
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump(CLUSTER))
    started = subprocess.run([RAY, "start", "--head", "--num-cpus=1", f"--autoscaling-config={config}"],
                             capture_output=True, text=True, timeout=180,
                             env={**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        yield config, env
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


def test_gpu_requests_launch_gpu_workers_and_every_training_node_runs_on_one(autoscaling_cluster, tmp_path: Path):
    config, env = autoscaling_cluster
    preset = {**TINY, "name": "tiny-gpu",
              "resources": {**{a: {"cpus": 1, "gpus": 1} for a in ("vggf", "vggface", "resnet50")},
                            "fusion": {"cpus": 1}, "significance": {"cpus": 1}}}
    (tmp_path / "tiny-gpu.yaml").write_text(yaml.safe_dump(preset))
    out = subprocess.run(
        [sys.executable, str(REPO / "grid" / "run_all.py"), "--tasks", "gender", "--archs", "vggf",
         "--preset", str(tmp_path / "tiny-gpu.yaml"), "--ray-address", "auto", "--cluster-config", str(config),
         "--storage", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "running on Ray: 1 CPUs, 0 GPUs (the autoscaler may grow it to 3 CPUs, 4 GPUs)" in out.stdout

    nodes = subprocess.run([sys.executable, "-c", "import json, ray; ray.init(address='auto', logging_level='ERROR');"
                            "print(json.dumps([[n['NodeID'], n['Resources'].get('GPU', 0)] for n in ray.nodes()]))"],
                           capture_output=True, text=True, env=env, timeout=120)
    gpu_nodes = {node for node, gpus in yaml.safe_load(nodes.stdout.strip().splitlines()[-1]) if gpus > 0}
    assert gpu_nodes, "the autoscaler launched no GPU worker"

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("occkd-tiny-gpu").experiment_id], max_results=100)
    node_runs = [r for r in runs if "occkd.node" in r.data.tags]
    assert len(node_runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    training = [r for r in node_runs if r.data.tags["occkd.strategy"] not in ("fusion", "significance")]
    assert len(training) == 6
    for run in training:  # each on a launched GPU worker, with a GPU of its own
        assert run.data.tags["occkd.ray_node"] in gpu_nodes, run.info.run_name
        assert run.data.tags["occkd.gpu_ids"] != "-" and run.data.tags["occkd.workers"] == "1"
