"""Running the stage graph on Ray: one Tune experiment whose searcher releases a node when its parents
are done, so there is no barrier between stages. Runs on the driver.

:class:`DependencySearcher` suggests the ready node with the longest remaining chain of work below it
(critical-path priority), returns ``None`` while nothing is ready, and blocks the descendants of a node
that failed for good. It admits a node only where :class:`grid.capacity.ClusterCapacity` finds room.
Given a :class:`grid.ddp_workers.WorkersPolicy`, it also chooses each GPU training node's number of DDP
workers as it hands it out: more for the chains that bound the makespan. The trials it configures run
:func:`grid.trials.run_node_trial`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ray.tune.search import Searcher

from grid.artifacts import node_dir
from grid.bundles import node_bundles
from grid.graph import Node, Resources, StageGraph
from grid.ddp_workers import WorkersChoice, WorkersPolicy, describe_choice

if TYPE_CHECKING:
    from grid.capacity import ClusterCapacity


@dataclass(frozen=True)
class RunSettings:
    """What every trial needs besides its node (travels in the trial config)."""

    storage: str  # absolute path visible from every Ray node
    data_paths: Mapping[str, str]  # task -> prepared Arrow store
    ray_train: str = "multi-worker-only"  # resolved (see resolve_ray_train): "multi-worker-only" or "always"
    fault_injection: Mapping[str, int] | None = None  # tests only: node key -> attempts that fail
    train_max_failures: int = 2  # worker-group restarts Ray Train allows a node (FailureConfig)
    machine_gpus: float = 0.0  # GPUs of the largest machine: a node's GPU workers up to it share one machine
    code: str = ""  # the driver's grid.code.code_fingerprint(): a trial importing other code refuses to run
    # The preset's plugins (occkd_core.plugins), resolved: every trial and Train worker registers them before
    # it runs a node, as workers import occkd_core afresh.
    plugins: tuple[str, ...] = ()


class DependencySearcher(Searcher):
    """Suggests nodes whose parents are all done; a node that errors blocks its descendants."""

    def __init__(self, graph: StageGraph, to_run: list[str], done: set[str], settings: RunSettings,
                 capacity: "ClusterCapacity | None" = None,
                 workers_policy: WorkersPolicy | None = None) -> None:
        super().__init__(metric=None, mode=None)
        self.graph, self.settings, self.capacity, self.workers_policy = graph, settings, capacity, workers_policy
        self._bundle_cache: dict[str, list[dict[str, float]]] = {}
        self.resources: dict[str, Resources] = {}  # node key -> what it was handed out with (its workers)
        self.workers_choices: dict[str, WorkersChoice] = {}  # node key -> why it got its DDP workers
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
        """The resources ``key`` can start with now (its DDP workers chosen if it is a GPU training node), or None."""
        node = self.graph.nodes[key]
        if self.capacity is None:
            return node.resources
        if not self._chooses_workers(node):
            return node.resources if self.capacity.place(key, self._bundles(key)) else None
        room = self.capacity.free()
        res = node.resources
        # Workers of a node given more than the preset's (a whole GPU each, see with_ddp_workers) that one machine
        # has room for; one worker is the preset's own request, which place() checks below.
        per_worker = with_ddp_workers(res, res.workers + 1)
        free_workers = max((min(m.get("GPU", 0.0) // per_worker.gpus, m.get("CPU", 0.0) // max(res.cpus, 1e-9))
                            for m in room), default=0.0)
        total_gpus = sum(m.get("GPU", 0.0) for m in self.capacity.room())
        choice = self.workers_policy.choose(arch=node.arch, workers=res.workers, max_ddp_workers=res.max_ddp_workers,
                                            batch_size=int(node.params["train"]["batch_size"]),
                                            chain=self.priority[key],
                                            target=self._gpu_work_left() / max(total_gpus, 1.0),
                                            free_workers=max(int(free_workers), 1))
        if choice is None:
            return None
        # Should the chosen count not be placeable after all (its CPUs), fewer workers may be.
        for workers in sorted((w for w in choice.allowed if w <= choice.workers), reverse=True):
            resources = with_ddp_workers(res, workers)
            if self.capacity.place(key, self._node_bundles(key, resources)):
                self.workers_choices[key] = dataclasses.replace(choice, workers=workers)
                return resources
        return None

    def _chooses_workers(self, node: Node) -> bool:
        """Only GPU training nodes get their DDP workers chosen (a CPU-only cluster keeps the preset's)."""
        return self.workers_policy is not None and node.kind == "train" and node.resources.gpus > 0

    def _gpu_work_left(self) -> float:
        """GPU work of the nodes not yet finished, at one worker (cost × GPUs): what the rest cannot beat."""
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
        return {
            "node": node.to_dict(),
            "parents": [{"role": edge.role, "key": edge.key, "arch": self.graph.nodes[edge.key].arch,
                         "directory": str(node_dir(storage, self.graph.nodes[edge.key].hash))}
                        for edge in node.parents],
            "settings": self.settings.__dict__,
        }

    def workers_note(self, key: str) -> str | None:
        """Why a handed-out training node has its DDP workers, for its MLflow run (``occkd.workers_choice``): the
        rule's inputs when the searcher chose them, else the preset's count. None for other nodes. The driver
        records it from here, where the choice was made; the trial never carries it."""
        node = self.graph.nodes[key]
        if node.kind != "train":
            return None
        choice = self.workers_choices.get(key)
        if choice is not None:
            return describe_choice(choice)
        return f"{self.resources.get(key, node.resources).workers} (the preset's)"

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


def with_ddp_workers(resources: Resources, workers: int) -> Resources:
    """A node's resources at ``workers`` DDP workers: the preset's own at its own count, else a whole GPU per
    worker (NCCL cannot run two ranks of one job on the same GPU, so a half-GPU VGG-f node takes whole ones)."""
    if workers == resources.workers:
        return resources
    return dataclasses.replace(resources, gpus=float(max(1, math.ceil(resources.gpus))), workers=workers)
