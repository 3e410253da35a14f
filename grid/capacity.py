"""The driver's model of the cluster: what it has now and what its autoscaler may add.

- :func:`cluster_shape` and :func:`fit_resources` fit the preset's requests to the cluster once, before
  the grid starts; :func:`resolve_ray_train` decides there whether training nodes run as Ray Train workers.
- :class:`ClusterCapacity` admits a node only when its resources fit the cluster as it is now plus the
  nodes its autoscaler may still add, re-read as nodes join and leave, so trial drivers never wait
  on workers that cannot be placed; :func:`max_concurrency` only caps Tune's trial count.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from grid.bundles import HEAD
from grid.graph import Resources


def resolve_ray_train(mode: str, shape: "ClusterShape") -> str:
    """``auto`` (the default): every training node through Ray Train on a cluster that has or can add GPUs
    (``always``); on a CPU-only one ``multi-worker-only``: only nodes with several DDP workers go through Ray
    Train, a one-worker node trains inside its trial (there a worker group costs more to start than a small
    node trains). ``always`` / ``multi-worker-only`` force either way."""
    if mode == "auto":
        return "always" if shape.can_have_gpus else "multi-worker-only"
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
    """Node type -> (resources, max_nodes) from a Ray cluster-launcher config (``available_node_types``; Ray
    calls the most nodes of a type ``max_workers``, machines the autoscaler may launch, not DDP workers):
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
    change it) plus, per autoscaler node type, the nodes it may still launch (its ``max_nodes`` less the
    live nodes of that type, matched by their CPU/GPU totals). The bundles of the running nodes, in the
    order they were handed out, then the candidate's, are placed where Ray would place them
    (:func:`ray_like_choice`): a candidate is admitted only if all fit. Ray places the bundles itself; the
    model only keeps Tune from launching trials whose Train workers could not be placed (they would wait,
    as they did on a 2-core machine), and tells the DDP worker rule how many GPUs one machine has free.
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
            for resources, max_nodes in self.node_types.values():
                same = sum(1 for n in live if all(n.get(k, 0.0) == resources.get(k, 0.0) for k in ("CPU", "GPU")))
                launchable += [{k: resources.get(k, 0.0) for k in ("CPU", "GPU")}] * max(0, max_nodes - same)
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

