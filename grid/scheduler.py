"""Running the stage graph on Ray: one Tune experiment whose searcher releases a node when its parents
are done, so there is no barrier between stages.

- :class:`DependencySearcher` suggests the ready node with the longest remaining chain of work below
  it (critical-path priority), returns ``None`` while nothing is ready, and blocks the descendants of
  a node that failed for good.
- :func:`run_node_trial` is the Tune trainable. A one-worker node trains inside the trial process,
  which already holds the node's CPUs/GPU; a node asking for several workers (or every training node
  with ``ray_train="always"``) runs its loop in a Ray Train ``TorchTrainer`` worker group with DDP.
  (On a small machine a Train worker group costs 18-30 s to start, more than a smoke node trains.)
- :func:`max_concurrency` sizes concurrency from the cluster so trial drivers never starve workers.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ray import tune
from ray.tune.search import Searcher

from grid.artifacts import node_dir
from grid.graph import Node, Resources, StageGraph

if TYPE_CHECKING:
    from grid.nodes import ParentOutput


@dataclass(frozen=True)
class RunSettings:
    """What every trial needs besides its node (travels in the trial config)."""

    storage: str  # absolute path visible from every Ray node
    data_paths: Mapping[str, str]  # task -> prepared Arrow store
    ray_train: str = "multi"  # "multi": Train worker groups only for multi-worker nodes; "always"
    fault_injection: Mapping[str, Any] | None = None  # tests only: {"node": key, "times": n}
    train_max_failures: int = 2  # worker-group restarts Ray Train allows a node (FailureConfig)


class DependencySearcher(Searcher):
    """Suggests nodes whose parents are all done; a node that errors blocks its descendants."""

    def __init__(self, graph: StageGraph, to_run: list[str], done: set[str], settings: RunSettings) -> None:
        super().__init__(metric=None, mode=None)
        self.graph, self.settings = graph, settings
        self.pending = list(to_run)
        self.done = set(done)
        self.running: dict[str, str] = {}  # trial_id -> node key
        self.failed: dict[str, str] = {}  # node key -> reason
        self.blocked: dict[str, str] = {}  # node key -> failed ancestor
        # Wall-clock times for the timeline (grid.timeline): handed to Tune, and seen finished.
        self.ready_at: dict[str, float] = {}
        self.completed_at: dict[str, float] = {}
        priority = graph.critical_path()
        self.pending.sort(key=lambda k: -priority[k])

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        for key in self.pending:
            if all(p in self.done for p in self.graph.nodes[key].parent_keys):
                self.pending.remove(key)
                self.running[trial_id] = key
                self.ready_at[key] = time.time()
                return self._config(key)
        if not self.pending or (not self.running and self.pending):
            return Searcher.FINISHED
        return None  # something is running; its completion may release more nodes

    def _config(self, key: str) -> dict[str, Any]:
        node = self.graph.nodes[key]
        storage = Path(self.settings.storage)
        return {
            "node": node.to_dict(),
            "parents": [{"role": edge.role, "key": edge.key, "arch": self.graph.nodes[edge.key].arch,
                         "directory": str(node_dir(storage, self.graph.nodes[edge.key].hash))}
                        for edge in node.parents],
            "settings": self.settings.__dict__,
        }

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self.running.pop(trial_id, None)
        if key is None:
            return
        self.completed_at[key] = time.time()
        if error:
            self.failed[key] = "trial errored"
            for child in self.graph.descendants(key):
                if child in self.pending:
                    self.pending.remove(child)
                    self.blocked[child] = key
        else:
            self.done.add(key)


def trial_resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:
    """A one-worker node holds its CPUs/GPU in the trial itself; a Train node's trial holds a sliver of
    CPU and its TorchTrainer asks for the workers (with trial drivers holding
    0.5 CPU each, Train worker groups on a 2-core machine could not be placed and timed out)."""
    res = config["node"]["resources"]
    if _uses_train(config):
        return tune.PlacementGroupFactory([{"CPU": 0.01}])
    bundle = {"CPU": float(res["cpus"])}
    if res["gpus"]:
        bundle["GPU"] = float(res["gpus"])
    return tune.PlacementGroupFactory([bundle])


def _uses_train(config: dict[str, Any]) -> bool:
    node = config["node"]
    return node["kind"] == "train" and (node["resources"]["workers"] > 1 or config["settings"]["ray_train"] == "always")


@dataclass(frozen=True)
class ClusterShape:
    """What the grid may ask of a cluster: the nodes it has now and those its autoscaler can add."""

    nodes: tuple[Mapping[str, float], ...]  # resources of each live node and of each launchable node type
    potential: Mapping[str, float]  # CPU / GPU totals once the autoscaler has launched all it may
    node_types: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # autoscaler type -> resources

    @property
    def can_have_gpus(self) -> bool:
        return self.potential.get("GPU", 0.0) > 0


def read_node_types(config_path: Path) -> dict[str, tuple[dict[str, float], int]]:
    """Node type -> (resources, max_workers) from a Ray cluster-launcher config (``available_node_types``):
    the file ``ray up`` leaves on the head as ~/ray_bootstrap_config.yaml, or the one given to
    ``ray start --autoscaling-config``."""
    import yaml

    raw = yaml.safe_load(Path(config_path).read_text()) or {}
    types = raw.get("available_node_types")
    if not isinstance(types, Mapping) or not types:
        raise ValueError(f"{config_path} has no available_node_types; is it a Ray cluster config?")
    head = raw.get("head_node_type")
    return {name: ({k: float(v) for k, v in (spec.get("resources") or {}).items()},
                   0 if name == head else int(spec.get("max_workers", raw.get("max_workers", 0))))
            for name, spec in types.items()}


def cluster_shape(now: Mapping[str, float], live_nodes: list[Mapping[str, float]],
                  node_types: Mapping[str, tuple[Mapping[str, float], int]] | None = None) -> ClusterShape:
    """The shape of a cluster from ``ray.cluster_resources()``, its live nodes' resources and, when known,
    the autoscaler's node types: a GPU request is kept if any node has or can bring GPUs."""
    node_types = node_types or {}
    potential = {key: float(now.get(key, 0.0)) + sum(res.get(key, 0.0) * count for res, count in node_types.values())
                 for key in ("CPU", "GPU")}
    launchable = tuple(res for res, count in node_types.values() if count > 0)
    return ClusterShape(nodes=(*live_nodes, *launchable), potential=potential,
                        node_types={name: res for name, (res, count) in node_types.items() if count > 0})


def fit_resources(wanted: Resources, shape: ClusterShape) -> Resources:
    """Clamp a request to what the cluster has or can get: GPUs kept wherever some node has or can bring
    them (else CPU training); never more CPUs than the largest node. A GPU request that no node or node
    type can hold is an error naming them."""
    largest_cpus = max((node.get("CPU", 0.0) for node in shape.nodes), default=1.0)
    cpus = max(0.5, min(wanted.cpus, largest_cpus))
    gpus = wanted.gpus if shape.can_have_gpus else 0.0
    if gpus and not any(node.get("GPU", 0.0) >= gpus and node.get("CPU", 0.0) >= cpus for node in shape.nodes):
        types = "; ".join(f"{name}: {dict(res)}" for name, res in shape.node_types.items()) or "none"
        raise ValueError(f"no node can hold a request of {cpus:g} CPUs and {gpus:g} GPUs; live nodes "
                         f"{[dict(n) for n in shape.nodes]}, autoscaler node types {types}")
    return Resources(cpus=cpus, gpus=gpus, workers=wanted.workers)


def max_concurrency(resources: list[Resources], cluster: Mapping[str, float]) -> int:
    """How many nodes can hold their resources at once, counted with the smallest request, so trial
    drivers never wait on workers that cannot be placed."""
    total_cpu, total_gpu = cluster.get("CPU", 1.0), cluster.get("GPU", 0.0)
    limits = [math.floor(total_cpu / max(min(r.cpus * r.workers for r in resources), 1e-9))]
    gpu_requests = [r.gpus * r.workers for r in resources if r.gpus > 0]
    if gpu_requests and total_gpu > 0:
        # GPU nodes and CPU-only nodes (fusion, statistics) run side by side.
        limits = [limits[0] + math.floor(total_gpu / min(gpu_requests))]
    return max(1, min(limits[0], len(resources)))


def run_node_trial(config: dict[str, Any]) -> None:
    """Tune trainable: run one node and report its epochs; the sealed result stays on storage."""
    started_at = time.time()
    import torch

    from grid import nodes

    node, settings = Node.from_dict(config["node"]), config["settings"]
    storage = Path(settings["storage"])
    parents = _parent_outputs(config)
    data_path = Path(settings["data_paths"][node.task])
    _maybe_inject_fault(node, settings, storage)
    if node.kind == "train" and _uses_train(config):
        _run_with_torch_trainer({**config, "trial_started_at": started_at})
    elif node.kind == "train":
        torch.set_num_threads(max(1, int(node.resources.cpus)))
        import ray

        device = torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")
        nodes.run_train_node(node, storage, data_path, parents, device=device, report=tune.report,
                             pretrained=_pretrained_file(node), started_at=started_at,
                             placement=_placement(device, workers=1, ray_train=False))
    elif node.kind == "fusion":
        torch.set_num_threads(max(1, int(node.resources.cpus)))
        nodes.run_fusion_node(node, storage, data_path, parents, started_at=started_at)
    else:
        nodes.run_significance_node(node, storage, data_path, parents, started_at=started_at)
    tune.report({"event": "done"})


def _train_worker_loop(config: dict[str, Any]) -> None:
    """Body of each Ray Train worker: the same node code, DDP set up by TorchTrainer."""
    import ray.train
    import ray.train.torch
    import torch

    from grid import nodes

    node, settings = Node.from_dict(config["node"]), config["settings"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(max(1, int(node.resources.cpus)))
    storage = Path(settings["storage"])
    # Train's checkpoint of a node is a pointer to its last.pt on the shared storage, where the training
    # loop keeps it (copying hundreds of MB into Train's own storage every epoch would buy nothing). After a
    # lost worker, Train restarts the group, get_checkpoint() says from which epoch, and train_stage
    # resumes from that last.pt.
    restored = ray.train.get_checkpoint()
    resumed_from = None
    if restored is not None:
        with restored.as_directory() as folder:
            resumed_from = json.loads((Path(folder) / "progress.json").read_text())["epoch"]

    def report(metrics: dict[str, Any]) -> None:
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "progress.json").write_text(json.dumps(
                {"node": node.key, "epoch": metrics.get("epoch"),
                 "last_checkpoint": str(node_dir(storage, node.hash) / "train" / "last.pt")}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    placement = _placement(ray.train.torch.get_device(), workers=context.get_world_size(), ray_train=True)
    nodes.run_train_node(node, storage, Path(settings["data_paths"][node.task]), _parent_outputs(config),
                         device=ray.train.torch.get_device(), report=report, pretrained=_pretrained_file(node),
                         is_writer=rank == 0, started_at=config.get("trial_started_at"),
                         placement={**placement, "resumed_from_epoch": resumed_from})


def _placement(device: Any, *, workers: int, ray_train: bool) -> dict[str, Any]:
    """Where a training node ran, for its record: the Ray node, the GPUs Ray gave it (logical ids: a fake
    or CPU-only cluster hands out GPU ids without CUDA), the torch device, and whether Ray Train ran it."""
    import ray

    return {"ray_node": ray.get_runtime_context().get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "device": str(device), "workers": workers, "ray_train": ray_train}


def _pretrained_file(node: Node) -> Path | None:
    """A teacher's starting weights file, or None (from scratch, or not a teacher)."""
    path = node.init.get("file")
    return Path(path) if path else None


def _parent_outputs(config: Mapping[str, Any]) -> list[ParentOutput]:
    from grid.nodes import ParentOutput  # noqa: F811 (imported here: the driver never needs grid.nodes)

    return [ParentOutput(role=p["role"], key=p["key"], arch=p["arch"], directory=Path(p["directory"]))
            for p in config["parents"]]


def _run_with_torch_trainer(config: dict[str, Any]) -> None:
    """The node's training loop as a Ray Train worker group: DDP (NCCL with GPUs, gloo without), Train's
    checkpoints, and a group that Train restarts (up to ``train_max_failures`` times) when a worker dies."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res, settings = config["node"]["resources"], config["settings"]
    per_worker = {"CPU": float(res["cpus"])}
    if res["gpus"]:
        per_worker["GPU"] = float(res["gpus"])
    trainer = TorchTrainer(
        _train_worker_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if res["gpus"] else "gloo"),
        scaling_config=ScalingConfig(num_workers=int(res["workers"]), use_gpu=bool(res["gpus"]),
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=f"train-{config['node']['hash']}",
                             storage_path=str(Path(settings["storage"]) / "ray_train"),
                             failure_config=FailureConfig(max_failures=int(settings.get("train_max_failures", 2))),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def _maybe_inject_fault(node: Node, settings: Mapping[str, Any], storage: Path) -> None:
    """Tests only: fail this node's first ``times`` attempts, counted in a file on storage."""
    fault = settings.get("fault_injection")
    if not fault or fault.get("node") != node.key:
        return
    counter = storage / "fault_injection" / f"{node.hash}.json"
    counter.parent.mkdir(parents=True, exist_ok=True)
    attempts = json.loads(counter.read_text())["attempts"] if counter.exists() else 0
    counter.write_text(json.dumps({"attempts": attempts + 1}))
    if attempts < int(fault.get("times", 1)):
        raise RuntimeError(f"injected fault in {node.key} (attempt {attempts + 1})")
