"""The cluster commands of docs/clusters.md on one machine: a Ray head started as cluster.yaml starts it (dashboard
on 127.0.0.1), then a small grid submitted with `ray job submit` that joins it with --ray-address auto.

From a new account's empty HOME, in that page's order: `python grid/ray_token.py` makes the cluster's token
(cluster.yaml copies that file to every node), the head starts in token mode, and the client, holding the
same token, submits with RAY_AUTH_MODE=token; a client without the token is told in one line what to do.
The Jobs API needs ray[default], which pyproject installs.
The test skips rather than disturb a Ray cluster that already runs on the machine, and stops only the
processes of the head it started."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import new_mlflow_store, use_empty_home
from grid.local_cluster import free_port, marked_ray
from test_grid_e2e import TINY

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray_cluster]  # runs after or before, never beside, the other clusters
#: The `ray` command installed beside this interpreter (CI may not have it first on PATH).
RAY = str(Path(sys.executable).parent / "ray") if (Path(sys.executable).parent / "ray").exists() else "ray"
DASHBOARD_PORT, GCS_PORT = 8299, 6399
#: The cluster path is under test, not the method: no teacher-free controls, two nodes fewer to wait for.
NO_CONTROLS = {**TINY, "controls": False}


def _head_start_command() -> tuple[dict[str, str], list[str]]:
    """cluster.yaml's `ray start --head …` (its environment assignments, its words), with the autoscaler
    config and ports this test cannot use."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    start = next(c for c in config["head_start_ray_commands"] if "ray start --head" in c)
    words = shlex.split(start.split(";")[-1])
    assert "--dashboard-host=127.0.0.1" in words  # never on a public interface
    assignments = dict(w.split("=", 1) for w in words[:words.index("ray")])
    keep = [w for w in words[words.index("ray") + 1:]
            if not w.startswith(("--port", "--autoscaling-config", "--object-manager-port"))]
    # The dashboard agent's own port too: its default (52365) may be held by another Ray on this machine (a grid
    # running beside the tests), and an agent that cannot bind it leaves `ray job submit` with "No available agent".
    return assignments, [RAY, *keep, f"--port={GCS_PORT}", f"--dashboard-port={DASHBOARD_PORT}", "--num-cpus=2",
                         f"--dashboard-agent-listen-port={free_port()}"]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """One head for this module's tests (starting and stopping one takes ~15 s each), from a new account's
    empty HOME."""
    with pytest.MonkeyPatch.context() as patch:
        home = use_empty_home(patch, tmp_path_factory.mktemp("home"))
        if subprocess.run([RAY, "status"], capture_output=True, env={**os.environ, "RAY_AUTH_MODE": "token"},
                          timeout=60).returncode == 0:
            pytest.skip("a Ray cluster already runs on this machine; not disturbing it")
        made = subprocess.run([sys.executable, "grid/ray_token.py"], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        token = home / ".ray" / "auth_token"
        assert made.returncode == 0 and made.stdout.strip() == f"Ray token: made {token} (mode 600)", made
        assignments, command = _head_start_command()
        assert assignments.get("RAY_AUTH_MODE") == "token"
        with marked_ray(command, {**os.environ, **assignments}) as env:  # stopped after: its processes, no other Ray
            yield env


def test_a_grid_submitted_with_ray_job_submit_runs_on_the_head(ray_head, tmp_path: Path):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(NO_CONTROLS))
    new_mlflow_store(tmp_path / "mlflow.db")
    command = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}", "--working-dir", ".", "--",
               sys.executable, "grid/run_all.py", "--tasks", "gender", "--archs", "vggf",
               "--preset", str(tmp_path / "tiny.yaml"), "--storage", str(tmp_path / "runs"),
               "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--ray-address", "auto"]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=ray_head, timeout=600)
    assert out.returncode == 0 and "succeeded" in out.stdout + out.stderr, out.stdout[-3000:] + out.stderr[-3000:]
    assert "8 nodes: 0 already complete, 8 to run" in out.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("occkd-tiny").experiment_id], max_results=100)
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * 9  # the grid's parent run and 8 node runs
    assert (tmp_path / "runs" / "reports" / "occkd-tiny" / "report.md").is_file()


def test_a_client_without_the_clusters_token_is_told_in_one_line(ray_head, tmp_path: Path):
    """A second account (no token) joining the token-mode head: exit 2 and one line saying what to do, not
    Ray's paragraph; the head's token is not made anew on the client."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(NO_CONTROLS))
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    env = {**ray_head, "HOME": str(stranger)}
    out = subprocess.run([sys.executable, "grid/run_all.py", "--tasks", "gender", "--archs", "vggf",
                          "--preset", str(tmp_path / "tiny.yaml"), "--storage", str(tmp_path / "runs"),
                          "--ray-address", f"127.0.0.1:{GCS_PORT}", "--dry-run"],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert len(errors) == 1 and "~/.ray/auth_token" in errors[0] and "RAY_AUTH_MODE=token" in errors[0], out.stderr
    assert "Traceback" not in out.stderr and not (stranger / ".ray" / "auth_token").exists()
