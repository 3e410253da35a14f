"""A local autoscaling Ray cluster and MLflow server, to try the cluster path on one machine.

    python grid/local_cluster.py --tasks gender --archs vggf [--preset smoke] [--gpus 4] [grid options]

starts Ray's fake multi-node provider (a CPU head whose autoscaler launches "GPU workers" as extra
raylets on this machine, with logical GPUs, as pending work asks for them) and a real ``mlflow server``
over HTTP, runs the grid against them exactly as on a cloud cluster (``--ray-address auto
--cluster-config ... --tracking-uri http://127.0.0.1:PORT``), and tears both down; the runs stay in
WORKDIR/mlflow.db (``mlflow ui --backend-store-uri sqlite:///WORKDIR/mlflow.db`` opens them).

Every training node of the preset asks for ``--gpus`` GPUs and 1 CPU (the preset is copied to WORKDIR
with that change), since Ray's autoscaler launches GPU nodes only for work that asks for GPUs. The
workers' GPUs are logical: CUDA is absent, so training runs on the CPU device with the gloo DDP backend,
but every scheduling decision (autoscaling, placement, Ray Train worker groups, restarts after a lost
node) is Ray's real one. It refuses to start where a Ray cluster already runs.

The cluster runs with Ray's token authentication, as a cloud one should: the script makes the token
(``~/.ray/auth_token``, mode 600) when the account has none, never overwrites one, and says where it is;
everything it starts gets ``RAY_AUTH_MODE=token`` (:mod:`grid.ray_token`).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `occkd_core` importable from a clone
    sys.path.insert(0, str(REPO))
from grid.ray_token import describe, ensure_token, token_env  # noqa: E402  (after the path above)

RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"
MLFLOW = str(Path(sys.executable).with_name("mlflow")) if Path(sys.executable).with_name("mlflow").exists() else "mlflow"


def fake_cluster_config(source: Path = REPO / "cluster.yaml", *, head_cpus: int = 1,
                        max_nodes: int = 2) -> dict[str, Any]:
    """A config for Ray's fake multi-node provider with the worker node types of ``source`` (the project's
    cluster.yaml: the same names and resources, at ``min_workers: 0``, at most ``max_nodes`` of each: Ray's
    own key for it is ``max_workers``, a count of machines, not of DDP workers), and
    a head of ``head_cpus`` CPUs (the provider names it ``ray.head.default``). Resources are logical: a
    48-CPU, 4-GPU worker type is a raylet that schedules as one. ``disable_node_updaters``: the
    provider's nodes cannot be re-tagged, so the updater would mark every launch failed."""
    cloud = yaml.safe_load(Path(source).read_text())
    workers = {name: {"resources": dict(spec.get("resources") or {}), "node_config": {},
                      "min_workers": 0, "max_workers": min(max_nodes, int(spec.get("max_workers", max_nodes)))}
               for name, spec in cloud["available_node_types"].items() if name != cloud["head_node_type"]}
    return {
        "cluster_name": "occkd-local", "max_workers": max_nodes * len(workers), "upscaling_speed": 1.0,
        "idle_timeout_minutes": 1,
        "provider": {"type": "fake_multinode", "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {},
                                                      "max_workers": 0}, **workers},
        "head_node_type": "ray.head.default",
        **{key: [] for key in ("cluster_synced_files", "rsync_exclude", "rsync_filter", "initialization_commands",
                               "setup_commands", "head_setup_commands", "worker_setup_commands",
                               "head_start_ray_commands", "worker_start_ray_commands")},
        "file_mounts": {}, "file_mounts_sync_continuously": False,
    }


def ray_is_running() -> bool:
    return subprocess.run([RAY, "status"], capture_output=True, env=token_env(), timeout=60).returncode == 0


#: Every process of a Ray cluster started here carries this variable in its environment (its head, the
#: autoscaler, the fake worker nodes it launches and every worker process, which inherit it), so that
#: stopping it ends those and nothing else: `ray stop` ends every Ray on the machine, another grid's local
#: Ray or another user's included.
CLUSTER_MARK = "OCCKD_RAY_CLUSTER"
CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")  # where `ray start` leaves the address it started


def marked_processes(mark: str) -> list[int]:
    """The processes whose environment holds ``CLUSTER_MARK=mark`` (read from /proc; Linux)."""
    needle = f"{CLUSTER_MARK}={mark}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0") and int(environ.parent.name) != os.getpid():
                found.append(int(environ.parent.name))
        except (OSError, ValueError):  # gone meanwhile, or another user's
            continue
    return found


def stop_marked(mark: str, grace: float = 15.0) -> None:
    """Stop the cluster marked ``mark``: SIGTERM to each of its processes, SIGKILL to what is left after
    ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in marked_processes(mark):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while marked_processes(mark) and time.monotonic() < deadline:
            time.sleep(0.2)


@contextmanager
def marked_ray(command: list[str], env: Mapping[str, str]) -> Iterator[dict[str, str]]:
    """Run ``ray start ...`` (``command``) with ``env`` and a fresh cluster mark; yield the environment to talk
    to it; afterwards stop exactly its processes and forget its address if ``ray start`` left it current."""
    marked = {**env, CLUSTER_MARK: uuid.uuid4().hex}
    started = subprocess.run(command, capture_output=True, text=True, timeout=180, env=marked)
    current = CURRENT_CLUSTER.read_text() if CURRENT_CLUSTER.exists() else None
    try:
        if started.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{started.stdout[-2000:]}{started.stderr[-2000:]}")
        yield marked
    finally:
        stop_marked(marked[CLUSTER_MARK])
        if current is not None and CURRENT_CLUSTER.exists() and CURRENT_CLUSTER.read_text() == current:
            CURRENT_CLUSTER.unlink(missing_ok=True)  # a bare ray.init() would wait on the dead cluster


@contextmanager
def autoscaling_cluster(config: Mapping[str, Any], workdir: Path) -> Iterator[Path]:
    """Start a fake autoscaling cluster from ``config`` (written to workdir/cluster.yaml) and stop it after
    (its own processes only, :func:`marked_ray`). The fake workers dial the GCS on Ray's default port 6379,
    so the head must use it."""
    if ray_is_running():
        raise RuntimeError("a Ray cluster already runs on this machine; stop it first (ray stop) or use it directly")
    print(describe(*ensure_token()), flush=True)  # `ray start` in token mode refuses to run without one
    path = workdir / "cluster.yaml"
    path.write_text(yaml.safe_dump(dict(config)))
    command = [RAY, "start", "--head", "--port=6379",
               f"--num-cpus={config['available_node_types']['ray.head.default']['resources']['CPU']}",
               f"--autoscaling-config={path}"]
    with marked_ray(command, {**token_env(), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}):
        yield path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def latest_experiment(store_uri: str) -> str:
    """The id of the experiment the grid just wrote to (the store's most recently updated one)."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient(store_uri).search_experiments(order_by=["last_update_time DESC"], max_results=1)
    return found[0].experiment_id if found else "0"


@contextmanager
def mlflow_server(workdir: Path, port: int | None = None, store_uri: str | None = None) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1, its SQLite store and artifacts under ``workdir`` (or serving an
    existing ``store_uri``); yields its URI."""
    port = port or free_port()
    log = open(workdir / "mlflow-server.log", "w")
    process = subprocess.Popen(
        [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", store_uri or f"sqlite:///{workdir / 'mlflow.db'}",
         "--artifacts-destination", str(workdir / "mlartifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start; see {workdir / 'mlflow-server.log'}")
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def grid_command(config_path: Path, tracking_uri: str, storage: Path, grid_args: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "grid" / "run_all.py"), "--ray-address", "auto",
            "--cluster-config", str(config_path), "--tracking-uri", tracking_uri, "--storage", str(storage), *grid_args]


def kill_ray_node(node_id: str) -> bool:
    """Stop one Ray node as a lost machine would: SIGKILL its raylet (its workers die with it)."""
    found = subprocess.run(["pgrep", "-f", f"raylet.*--node_id={node_id}"], capture_output=True, text=True)
    pids = [int(p) for p in found.stdout.split()]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return bool(pids)


def gpu_preset(preset: str, gpus: float, workdir: Path) -> Path:
    """The preset (a built-in name or a YAML path) with every training node asking for ``gpus`` GPUs and
    1 CPU, written to ``workdir``; ``gpus`` 0 leaves it as it is."""
    from occkd_core.presets import PRESET_DIR, preset_mapping

    path = Path(preset) if Path(preset).suffix in (".yaml", ".yml") else PRESET_DIR / f"{preset}.yaml"
    if not gpus:
        return path
    raw = preset_mapping(preset)  # with its `extends:` base merged in: the copy stands alone in workdir
    raw["name"] = f"{raw['name']}-local-gpu"
    raw["resources"] = {**(raw.get("resources") or {}),
                        **{arch: {"cpus": 1, "gpus": gpus} for arch in raw.get("models", {})}}
    target = workdir / f"{raw['name']}.yaml"
    target.write_text(yaml.safe_dump(raw))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("occkd_local_cluster"),
                        help="where the cluster config, MLflow store and grid storage go")
    parser.add_argument("--cluster-yaml", type=Path, default=REPO / "cluster.yaml",
                        help="the cloud config whose worker node types the local cluster copies")
    parser.add_argument("--max-nodes", type=int, default=2,
                        help="nodes of each worker type the autoscaler may launch (Ray's max_workers)")
    parser.add_argument("--preset", default="smoke", help="the grid's preset (built-in name or YAML path)")
    parser.add_argument("--gpus", type=float, default=4,
                        help="GPUs each training node asks for (4: a whole cluster.yaml worker; 0: the preset's own)")
    args, grid_args = parser.parse_known_args(argv)
    if any(arg.split("=")[0] == "--max-workers" for arg in grid_args):  # the grid would refuse it, but only later
        parser.error("--max-workers is now --max-nodes (nodes of each worker type the autoscaler may launch)")
    if not grid_args:
        grid_args = ["--tasks", "gender", "--archs", "vggf"]
    from occkd_core.presets import load_preset

    try:
        load_preset(args.preset)
    except ValueError as err:
        parser.error(str(err))
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    grid_args += ["--preset", str(gpu_preset(args.preset, args.gpus, workdir))]
    config = fake_cluster_config(args.cluster_yaml, max_nodes=args.max_nodes)
    if ray_is_running():
        print("error: a Ray cluster already runs on this machine; stop it first (ray stop) or run the grid on it "
              "with --ray-address auto", file=sys.stderr)
        return 2
    with autoscaling_cluster(config, workdir) as config_path, mlflow_server(workdir) as uri:
        print(f"local autoscaling cluster up ({config_path}); MLflow at {uri}", flush=True)
        code = subprocess.run(grid_command(config_path, uri, workdir / "occkd_runs", grid_args),
                              env=token_env()).returncode
    from grid.tracking import ui_command, ui_link

    store = f"sqlite:///{workdir / 'mlflow.db'}"
    print(f"cluster and MLflow server stopped (the link above with it); the runs: {ui_command(store)}, then "
          f"{ui_link(store, latest_experiment(store))}")
    return code


if __name__ == "__main__":
    sys.exit(main())
