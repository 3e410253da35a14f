"""Running the stage graph on Ray: one Tune experiment whose searcher releases a node when its parents
are done, so there is no barrier between stages.

- :class:`DependencySearcher` suggests the ready node with the longest remaining chain of work below
  it (critical-path priority), returns ``None`` while nothing is ready, and blocks the descendants of
  a node that failed for good. Given a :class:`grid.widths.WidthPolicy`, it also chooses each GPU
  training node's width (DDP workers) as it hands it out: wider for the chains that bound the makespan.
- :func:`run_node_trial` is the Tune trainable. On a cluster that has or can add GPUs every training
  node runs its loop as a Ray Train ``TorchTrainer`` worker group (DDP, Train's checkpoints and
  worker-group restarts); on a CPU-only cluster a one-worker node trains inside its trial process,
  which already holds the node's CPUs (a Train worker group costs 18-30 s to start on a small machine,
  more than a smoke node trains). :func:`resolve_ray_train` states the rule.
- :class:`ClusterCapacity` admits a node only when its resources fit the cluster as it is now plus the
  nodes its autoscaler may still add, re-read as nodes join and leave, so trial drivers never wait
  on workers that cannot be placed; :func:`max_concurrency` only caps Tune's trial count.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ray import tune
from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend
from ray.tune.search import Searcher

from grid.artifacts import node_dir
from grid.code import CODE_ROOT, check_same_code
from grid.graph import Node, Resources, StageGraph
from grid.widths import WidthChoice, WidthPolicy

if TYPE_CHECKING:
    from grid.nodes import ParentOutput


@dataclass(frozen=True)
class RunSettings:
    """What every trial needs besides its node (travels in the trial config)."""

    storage: str  # absolute path visible from every Ray node
    data_paths: Mapping[str, str]  # task -> prepared Arrow store
    ray_train: str = "multi"  # resolved (see resolve_ray_train): "multi" or "always"
    fault_injection: Mapping[str, int] | None = None  # tests only: node key -> attempts that fail
    train_max_failures: int = 2  # worker-group restarts Ray Train allows a node (FailureConfig)
    machine_gpus: float = 0.0  # GPUs of the largest machine: a node's GPU workers up to it share one machine
    code: str = ""  # the driver's grid.code.code_fingerprint(): a trial importing other code refuses to run


class DependencySearcher(Searcher):
    """Suggests nodes whose parents are all done; a node that errors blocks its descendants."""

    def __init__(self, graph: StageGraph, to_run: list[str], done: set[str], settings: RunSettings,
                 capacity: "ClusterCapacity | None" = None, widths: WidthPolicy | None = None) -> None:
        super().__init__(metric=None, mode=None)
        self.graph, self.settings, self.capacity, self.widths = graph, settings, capacity, widths
        self._bundle_cache: dict[str, list[dict[str, float]]] = {}
        self.resources: dict[str, Resources] = {}  # node key -> what it was handed out with (its width)
        self.width_choices: dict[str, WidthChoice] = {}  # node key -> why it got its width
        self.pending = list(to_run)
        self.done = set(done)
        self.running: dict[str, str] = {}  # trial_id -> node key
        self.failed: dict[str, str] = {}  # node key -> reason
        self.blocked: dict[str, str] = {}  # node key -> failed ancestor
        # Wall-clock times for the timeline (grid.timeline): handed to Tune, and seen finished.
        self.ready_at: dict[str, float] = {}
        self.completed_at: dict[str, float] = {}
        priority = graph.critical_path()
        self.priority = priority
        self.pending.sort(key=lambda k: -priority[k])

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        ready = [key for key in self.pending if all(p in self.done for p in self.graph.nodes[key].parent_keys)]
        if not ready and not self.running:
            return Searcher.FINISHED  # nothing left, or only descendants of failed nodes
        # By priority; a smaller ready node fills room the first cannot use. With nothing running, the first
        # ready node goes even if the packing finds no room: its request fits some node or node type
        # (fit_resources), so Ray places it or its autoscaler adds a node (the packing is only a model).
        admitted = None
        for key in ready:
            resources = self._admit(key)
            if resources is not None:
                admitted = key
                break
        if admitted is None and not self.running and ready:
            admitted, resources = ready[0], self.graph.nodes[ready[0]].resources
            if self.capacity is not None:
                self.capacity.place(admitted, self._bundles(admitted))  # where it can, if anywhere
        if admitted is None:  # running nodes may release more, or the cluster may grow (or get a node back)
            return None
        self.pending.remove(admitted)
        self.running[trial_id] = admitted
        self.resources[admitted] = resources
        self._bundle_cache[admitted] = self._node_bundles(admitted, resources)
        self.ready_at[admitted] = time.time()
        return self._config(admitted)

    def _admit(self, key: str) -> Resources | None:
        """The resources ``key`` can start with now (its width chosen if it is a widenable GPU node), or None."""
        node = self.graph.nodes[key]
        if self.capacity is None:
            return node.resources
        if not self._widenable(node):
            return node.resources if self.capacity.place(key, self._bundles(key)) else None
        room = self.capacity.free()
        res = node.resources
        # Workers of a widened node (a whole GPU each, see widened) that one machine has room for; width 1 is
        # the preset's own request, which place() checks below.
        per_worker = widened(res, res.workers + 1)
        free_workers = max((min(m.get("GPU", 0.0) // per_worker.gpus, m.get("CPU", 0.0) // max(res.cpus, 1e-9))
                            for m in room), default=0.0)
        total_gpus = sum(m.get("GPU", 0.0) for m in self.capacity.room())
        choice = self.widths.choose(arch=node.arch, workers=res.workers, max_workers=res.max_workers,
                                    batch_size=int(node.params["train"]["batch_size"]), chain=self.priority[key],
                                    target=self._gpu_work_left() / max(total_gpus, 1.0),
                                    free_workers=max(int(free_workers), 1))
        if choice is None:
            return None
        # Should the chosen width not be placeable after all (its CPUs), a narrower one may be.
        for width in sorted((w for w in choice.allowed if w <= choice.width), reverse=True):
            resources = widened(res, width)
            if self.capacity.place(key, self._node_bundles(key, resources)):
                self.width_choices[key] = dataclasses.replace(choice, width=width)
                return resources
        return None

    def _widenable(self, node: Node) -> bool:
        """Only GPU training nodes get a width (a CPU-only cluster keeps the preset's workers)."""
        return self.widths is not None and node.kind == "train" and node.resources.gpus > 0

    def _gpu_work_left(self) -> float:
        """GPU work of the nodes not yet finished, at width 1 (cost × GPUs): what the rest cannot beat."""
        keys = [*self.pending, *self.running.values()]
        return sum(self.graph.nodes[k].cost * self.graph.nodes[k].resources.gpus for k in keys)

    def _bundles(self, key: str) -> list[dict[str, float]]:
        """What a node holds while it runs; Tune asks for suggestions often, so computed once per node."""
        if key not in self._bundle_cache:
            self._bundle_cache[key] = self._node_bundles(key, self.graph.nodes[key].resources)
        return self._bundle_cache[key]

    def _node_bundles(self, key: str, resources: Resources) -> list[dict[str, float]]:
        return node_bundles({"kind": self.graph.nodes[key].kind, "resources": resources.as_dict()},
                            self.settings.ray_train, self.settings.machine_gpus)

    def _config(self, key: str) -> dict[str, Any]:
        node = self.graph.nodes[key].replace(resources=self.resources.get(key, self.graph.nodes[key].resources))
        storage = Path(self.settings.storage)
        choice = self.width_choices.get(key)
        return {
            "node": node.to_dict(),
            "width": None if choice is None else {**dataclasses.asdict(choice), "allowed": list(choice.allowed)},
            "parents": [{"role": edge.role, "key": edge.key, "arch": self.graph.nodes[edge.key].arch,
                         "directory": str(node_dir(storage, self.graph.nodes[edge.key].hash))}
                        for edge in node.parents],
            "settings": self.settings.__dict__,
        }

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self.running.pop(trial_id, None)
        if key is None:
            return
        if self.capacity is not None:
            self.capacity.release(key)
        self.completed_at[key] = time.time()
        if error:
            self.failed[key] = "trial errored"
            for child in self.graph.descendants(key):
                if child in self.pending:
                    self.pending.remove(child)
                    self.blocked[child] = key
        else:
            self.done.add(key)


#: Ray's marker resource of the head node.
HEAD = "node:__internal_head__"
#: What the trial of a node run through Ray Train holds itself: no CPU, only a sliver of the head node's
#: marker resource, so it runs on the head and every CPU and GPU stays for Train's workers. With trial
#: drivers holding 0.5 CPU each, Train worker groups on a 2-core machine could not be placed; with 0.01 CPU
#: on a GPU worker the node was left short of a whole CPU for its worker group, and with 0.01 CPU on a
#: 1-CPU head a CPU-only worker group could never go there (both seen on the local autoscaling cluster).
TRAIN_DRIVER = {HEAD: 0.001}


def trial_resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:
    """A node run in its trial holds its CPUs/GPU in the trial itself; a Train node's trial holds only
    ``TRAIN_DRIVER`` (on the head, no CPU) and its TorchTrainer asks for the workers."""
    if _uses_train(config):
        return tune.PlacementGroupFactory([dict(TRAIN_DRIVER)])
    return tune.PlacementGroupFactory(node_bundles(config["node"], config["settings"]["ray_train"]))


def node_bundles(node: Mapping[str, Any], ray_train: str, machine_gpus: float = 0.0) -> list[dict[str, float]]:
    """Every resource bundle a node holds while it runs: its trial's, and its Train workers' if any. GPU
    workers that fit one machine (``machine_gpus``) are placed together there (:func:`worker_placement`),
    so they count as one bundle of their sum."""
    res = node["resources"]
    bundle = {"CPU": float(res["cpus"]), **({"GPU": float(res["gpus"])} if res["gpus"] else {})}
    if uses_ray_train(node, ray_train):
        workers = int(res["workers"])
        if worker_placement(res, machine_gpus) == "STRICT_PACK":
            return [dict(TRAIN_DRIVER), {k: v * workers for k, v in bundle.items()}]
        return [dict(TRAIN_DRIVER)] + [dict(bundle) for _ in range(workers)]
    return [bundle]


def worker_placement(resources: Mapping[str, Any], machine_gpus: float) -> str:
    """Ray's placement strategy for a node's Train workers: several GPU workers that fit one machine stay on
    it (``STRICT_PACK``: DDP's all-reduce over NVLink, not the network); otherwise ``PACK`` (as few machines
    as Ray can, e.g. a preset that fixes more workers than a machine has GPUs)."""
    total = float(resources["gpus"]) * int(resources["workers"])
    return "STRICT_PACK" if int(resources["workers"]) > 1 and 0 < total <= machine_gpus else "PACK"


def widened(resources: Resources, width: int) -> Resources:
    """A node's resources at ``width`` workers: the preset's own at its width, else a whole GPU per worker
    (NCCL cannot run two ranks of one job on the same GPU, so a half-GPU VGG-f node takes whole ones)."""
    if width == resources.workers:
        return resources
    return dataclasses.replace(resources, gpus=float(max(1, math.ceil(resources.gpus))), workers=width)


def uses_ray_train(node: Mapping[str, Any], ray_train: str) -> bool:
    """Whether a node (as a dict) runs its loop as Ray Train workers under a resolved ``ray_train`` mode."""
    return node["kind"] == "train" and (node["resources"]["workers"] > 1 or ray_train == "always")


def _uses_train(config: dict[str, Any]) -> bool:
    return uses_ray_train(config["node"], config["settings"]["ray_train"])


def resolve_ray_train(mode: str, shape: "ClusterShape") -> str:
    """``auto`` (the default): every training node through Ray Train on a cluster that has or can add GPUs,
    inside its trial on a CPU-only one (there a worker group costs more to start than a small node
    trains; nodes with several workers still use Train). ``always`` / ``multi`` force either way."""
    if mode == "auto":
        return "always" if shape.can_have_gpus else "multi"
    return mode


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
    return dataclasses.replace(wanted, cpus=cpus, gpus=gpus)


def max_concurrency(resources: list[Resources], cluster: Mapping[str, float]) -> int:
    """An upper bound on the nodes that can hold their resources at once (counted with the smallest
    request) for Tune's ``max_concurrent_trials``; :class:`ClusterCapacity` decides node by node."""
    total_cpu, total_gpu = cluster.get("CPU", 1.0), cluster.get("GPU", 0.0)
    limits = [math.floor(total_cpu / max(min(r.cpus * r.workers for r in resources), 1e-9))]
    gpu_requests = [r.gpus * r.workers for r in resources if r.gpus > 0]
    if gpu_requests and total_gpu > 0:
        # GPU nodes and CPU-only nodes (fusion, statistics) run side by side.
        limits = [limits[0] + math.floor(total_gpu / min(gpu_requests))]
    return max(1, min(limits[0], len(resources)))


def live_nodes() -> list[dict[str, Any]]:
    """The total resources of each live Ray node (``ray.nodes()``), with its ``NodeID``."""
    import ray

    return [{**{k: float(v) for k, v in n["Resources"].items() if k in ("CPU", "GPU", HEAD)}, "NodeID": n["NodeID"]}
            for n in ray.nodes() if n.get("Alive")]


class ClusterCapacity:
    """Whether one more node fits the cluster, next to the nodes already running.

    The room is the live nodes (re-read at most every ``refresh_s`` seconds, so nodes that join or leave
    change it) plus, per autoscaler node type, the nodes it may still launch (``max_workers`` less the
    live nodes of that type, matched by their CPU/GPU totals). The bundles of the running nodes, in the
    order they were handed out, then the candidate's, are placed where Ray would place them
    (:func:`ray_like_choice`): a candidate is admitted only if all fit. Ray places the bundles itself; the
    model only keeps Tune from launching trials whose Train workers could not be placed (they would wait,
    as they did on a 2-core machine), and tells the width rule how many GPUs one machine has free.
    """

    def __init__(self, node_types: Mapping[str, tuple[Mapping[str, float], int]] | None = None,
                 read_nodes: Any = live_nodes, refresh_s: float = 2.0) -> None:
        self.node_types = dict(node_types or {})
        self.read_nodes, self.refresh_s = read_nodes, refresh_s
        self._room: list[dict[str, float]] = []  # live nodes, then launchable ones
        self._launchable = 0
        self._read_at = -math.inf
        # Node key -> where its bundles were placed, as (machine, bundle): Ray never moves a placed bundle, so
        # the model must not either (re-packing on every call once promised machines that were not free).
        self._placed: dict[str, list[tuple[str, dict[str, float]]]] = {}

    def room(self) -> list[dict[str, float]]:
        if time.monotonic() - self._read_at >= self.refresh_s:
            live = [dict(n) for n in self.read_nodes()]
            launchable = []
            for resources, max_workers in self.node_types.values():
                same = sum(1 for n in live if all(n.get(k, 0.0) == resources.get(k, 0.0) for k in ("CPU", "GPU")))
                launchable += [{k: resources.get(k, 0.0) for k in ("CPU", "GPU")}] * max(0, max_workers - same)
            self._room, self._launchable, self._read_at = live + launchable, len(launchable), time.monotonic()
        return self._room

    def _machine_ids(self) -> list[str]:
        room, live = self.room(), len(self.room()) - self._launchable
        return [str(m.get("NodeID", f"live-{i}")) if i < live else f"launchable-{i - live}" for i, m in enumerate(room)]

    def free(self) -> list[dict[str, float]]:
        """What each machine (live, then launchable) has left after the placed nodes. Bundles whose machine
        is gone (lost, or a launchable slot whose node has joined) are placed again where Ray would."""
        totals, ids = self.room(), self._machine_ids()
        free = [{k: v for k, v in m.items() if k != "NodeID"} for m in totals]
        index = {ident: i for i, ident in enumerate(ids)}
        live = len(free) - self._launchable
        for placed in self._placed.values():
            for n, (ident, bundle) in enumerate(placed):
                slot = index.get(ident)
                if slot is None or slot >= live:  # its machine is gone, or not launched yet: where Ray would put it now
                    slot = ray_like_choice(bundle, free, totals, live)
                    if slot is None:
                        continue  # nowhere now: Ray keeps it pending, the model counts it nowhere
                    placed[n] = (ids[slot], bundle)
                for k, v in bundle.items():
                    free[slot][k] = free[slot].get(k, 0.0) - v
        return free

    def place(self, key: str, bundles: list[dict[str, float]]) -> bool:
        """Record node ``key``'s bundles where Ray would place them, if all fit now; else change nothing."""
        free, totals, ids = self.free(), self.room(), self._machine_ids()
        live = len(free) - self._launchable
        placed = []
        for bundle in bundles:
            slot = ray_like_choice(bundle, free, totals, live)
            if slot is None:
                return False
            placed.append((ids[slot], dict(bundle)))
            for k, v in bundle.items():
                free[slot][k] = free[slot].get(k, 0.0) - v
        self._placed[key] = placed
        return True

    def release(self, key: str) -> None:
        self._placed.pop(key, None)

    def admits(self, held: list[list[dict[str, float]]], candidate: list[dict[str, float]]) -> bool:
        """Whether ``candidate`` fits next to ``held`` placed in that order: a what-if through :meth:`place`
        on an empty record, which is then put back."""
        saved, self._placed = self._placed, {}
        try:
            return all(self.place(f"what-if-{i}", bundles) for i, bundles in enumerate([*held, candidate]))
        finally:
            self._placed = saved

    def __getstate__(self) -> dict[str, Any]:  # Tune checkpoints its searcher: drop the cached room
        return {**self.__dict__, "_room": [], "_launchable": 0, "_read_at": -math.inf}


def ray_like_choice(bundle: Mapping[str, float], free: list[dict[str, float]], totals: list[Mapping[str, float]],
                    live: int) -> int | None:
    """The machine Ray would place ``bundle`` on, as an index into ``free``, or None if none has room.

    Ray spreads placement groups: ten one-GPU bundles on four empty 8-GPU machines land 3, 3, 2, 2
    (measured with Ray 2.60), so a model that packed them first-fit would promise an 8-GPU machine that
    is not there. So: a live machine before one the autoscaler must launch (which, as in Ray, takes only
    work that asks for GPUs), then the least used share of what the bundle asks for; CPU-only work
    keeps off GPU machines while it can (Ray's scheduler avoids GPU nodes for it).
    """
    def fits(i: int) -> bool:
        machine = free[i]
        return (all(machine.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items())
                and (i < live or bundle.get("GPU", 0.0) > 0 or not totals[i].get("GPU", 0.0)))

    def preference(i: int) -> tuple:
        share = min((free[i].get(k, 0.0) - v) / totals[i][k] for k, v in bundle.items() if totals[i].get(k))
        cpu_on_gpu_machine = not bundle.get("GPU") and totals[i].get("GPU", 0.0) > 0
        return (i < live, not cpu_on_gpu_machine, share, -i)

    candidates = [i for i in range(len(free)) if fits(i)]
    return max(candidates, key=preference) if candidates else None


def run_node_trial(config: dict[str, Any]) -> None:
    """Tune trainable: run one node and report its epochs; the sealed result stays on storage."""
    started_at = time.time()
    import torch

    from grid import nodes

    node, settings = Node.from_dict(config["node"]), config["settings"]
    check_same_code(settings.get("code", ""), f"the trial of {node.key}")
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
                             placement=_placement(device, workers=1, ray_train=False, width=config.get("width")))
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
    check_same_code(settings.get("code", ""), f"a Ray Train worker of {node.key}")
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

    # Train hands out cuda:N for every GPU Ray assigned, even where CUDA is absent (logical GPUs).
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    placement = _placement(device, workers=context.get_world_size(), ray_train=True, width=config.get("width"))
    nodes.run_train_node(node, storage, Path(settings["data_paths"][node.task]), _parent_outputs(config),
                         device=device, report=report, pretrained=_pretrained_file(node),
                         is_writer=rank == 0, started_at=config.get("trial_started_at"),
                         placement={**placement, "resumed_from_epoch": resumed_from})


def _placement(device: Any, *, workers: int, ray_train: bool, width: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Where a training node ran, for its record: the Ray node, the GPUs Ray gave it (logical ids: a fake
    or CPU-only cluster hands out GPU ids without CUDA), the torch device, whether Ray Train ran it, and why
    it got its width when the grid chose it (``width``: a :class:`WidthChoice` as a dict)."""
    import ray

    from grid.widths import describe_choice

    return {"ray_node": ray.get_runtime_context().get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "device": str(device), "workers": workers, "ray_train": ray_train, "code_root": str(CODE_ROOT),
            "width": describe_choice(WidthChoice(**{**width, "allowed": tuple(width["allowed"])})) if width
            else f"{workers} (the preset's)"}


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
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res, settings = config["node"]["resources"], config["settings"]
    per_worker = {"CPU": float(res["cpus"])}
    if res["gpus"]:
        per_worker["GPU"] = float(res["gpus"])
    trainer = TorchTrainer(
        _train_worker_loop,
        train_loop_config=config,
        torch_config=DeviceTorchConfig(),
        scaling_config=ScalingConfig(num_workers=int(res["workers"]), use_gpu=bool(res["gpus"]),
                                     resources_per_worker=per_worker,
                                     placement_strategy=worker_placement(res, float(settings.get("machine_gpus", 0)))),
        run_config=RunConfig(name=f"train-{config['node']['hash']}",
                             storage_path=str(Path(settings["storage"]) / "ray_train"),
                             failure_config=FailureConfig(max_failures=int(settings.get("train_max_failures", 2))),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             callbacks=[TuneReportCallback()]),
    )
    trainer.fit()


def _cuda_usable() -> bool:
    import torch

    return torch.cuda.is_available()


class _DeviceBackend(_TorchBackend):
    """Ray's torch backend, choosing the DDP backend from what the workers' torch sees: NCCL when every
    worker has CUDA, gloo otherwise. Ray's own rule (NCCL whenever GPUs are requested) breaks on nodes
    whose GPUs Ray schedules but CUDA cannot use (logical GPUs of a test cluster, a node with a broken
    driver): NCCL refuses to start there, gloo trains on the CPU device that ``get_device()`` returns."""

    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        cuda = all(worker_group.execute(_cuda_usable))
        super().on_start(worker_group, dataclasses.replace(backend_config, backend="nccl" if cuda else "gloo"))


@dataclass
class DeviceTorchConfig(TorchConfig):
    """``TorchConfig`` whose process-group backend follows the workers' devices (:class:`_DeviceBackend`)."""

    @property
    def backend_cls(self) -> type:
        return _DeviceBackend


def _maybe_inject_fault(node: Node, settings: Mapping[str, Any], storage: Path) -> None:
    """Tests only: fail this node's first ``times`` attempts, counted in a file on storage. The setting maps
    node keys to their ``times``."""
    times = (settings.get("fault_injection") or {}).get(node.key)
    if times is None:
        return
    counter = storage / "fault_injection" / f"{node.hash}.json"
    counter.parent.mkdir(parents=True, exist_ok=True)
    attempts = json.loads(counter.read_text())["attempts"] if counter.exists() else 0
    counter.write_text(json.dumps({"attempts": attempts + 1}))
    if attempts < int(times):
        raise RuntimeError(f"injected fault in {node.key} (attempt {attempts + 1})")
