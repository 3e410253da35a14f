"""The stage graph: tasks × architectures × stages × hyperparameters × seeds, with dependency edges.

Per task × architecture × seed (spec §5): teacher (full faces) → main student and ablation student →
standard KD and triplet KD, each from the main student, one node per point of the preset's grid, and
beside each its teacher-free control (one node per point of the settings the control reads) → fusion
(picks the best KD node of each kind, and the best control of each, by validation). Per task × seed: the significance job,
whose parents are every fusion node of the task. Every node carries a content hash of its resolved
spec and its parents' hashes: the key under which its outputs are stored, so a rerun skips it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from grid.node_specs import FusionSpec, SignificanceSpec
from occkd_core.models import get_architecture
from occkd_core.presets import Preset
from occkd_core.pretrained import FROM_SCRATCH, WeightsFile
from occkd_core.specs import TrainSpec
from occkd_core.stages import CONTROL_SUFFIX, STAGES, control_stages, distilled_stages, get_stage, stage_starting_from
from occkd_core.tasks import get_task
from occkd_core.training import StageSpec

#: Bump when a change to the code makes old outputs invalid (it is part of every node hash).
#: 2: a teacher's starting weights (name and file checksum) joined its identity; before, a teacher trained
#: from pre-trained weights and one trained from scratch shared a hash.
GRAPH_VERSION = 3
# 3: VGG-f's published LRN (k = 2, α = 5e-4); a stage's identity holds only the loss settings it reads (the
#    hint KD nodes lost τ and τ²); the main student saves its embeddings (fusion's student_svm); dropout is
#    seeded per rank and epoch, and no rows are dropped with > 1 DDP worker; triplet KD visits its rows in a new order;
#    fusion's linear SVM is one-vs-rest liblinear and its linear ε-SVR centres ages; age verdicts follow the ranks.

#: The node of the student trained on the other half: never distilled (spec §1, §15 #33).
ABLATION_SUFFIX = "_ablation"


def node_order() -> tuple[str, ...]:
    """Every node stage in curriculum order, from the stage registry (progress lines, reports)."""
    student = stage_starting_from("teacher")
    names: list[str] = []
    for name, stage in STAGES.items():
        names += [name, name + ABLATION_SUFFIX] if name == student else [name]
        names += [name + CONTROL_SUFFIX] if stage.distilled else []
    return (*names, "fusion", "significance")


@dataclass(frozen=True)
class Resources:
    """What one node asks Ray for."""

    cpus: float = 1.0
    gpus: float = 0.0
    workers: int = 1  # >1: a Ray Train worker group with DDP, each worker with `gpus` GPUs
    # The most DDP workers the grid may give a GPU node (grid.ddp_workers): 0 = up to one machine's GPUs;
    # equal to ``workers`` = fixed at ``workers``. Not part of any hash: the worker count does not change the
    # training.
    max_ddp_workers: int = 0

    def as_dict(self) -> dict[str, float]:
        return {"cpus": self.cpus, "gpus": self.gpus, "workers": self.workers, "max_ddp_workers": self.max_ddp_workers}


@dataclass(frozen=True)
class Edge:
    """A dependency: node ``key`` is the parent that plays ``role`` for its child."""

    role: str  # "teacher" | "student" (the parent checkpoints a stage starts from or runs beside), a
    # distilled stage (a fusion node's candidates), "fusion" (the significance node's fused models)
    key: str


@dataclass(frozen=True)
class Node:
    key: str  # readable and unique, e.g. "fer/vggface/triplet_kd[margin=0.1]"
    kind: str  # "train" | "fusion" | "significance"
    task: str
    arch: str | None
    stage: str  # a stage of occkd_core.stages (or a control), student_ablation, fusion, significance (node_order())
    train_faces: str  # full | lower | upper | full+lower | full+upper (spec §0 codes)
    seed: int
    # The resolved spec as plain data (hashed): StageSpec.to_dict() for training nodes, FusionSpec /
    # SignificanceSpec.to_dict() (grid.node_specs) for the others.
    params: Mapping[str, Any]
    parents: tuple[Edge, ...]
    resources: Resources
    cost: float  # estimated relative work, for scheduling priority and the benchmark's cost model
    hash: str = ""
    grid_point: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"margin": 0.1}
    # Teachers only: where training starts, {"weights": name | "from_scratch", "sha256": ..., "file": path,
    # "input_mean": [r, g, b] when the file names one}. Name and checksum are part of the hash (and so of
    # every descendant's); the path is not, nor the mean, which the checksummed bytes already fix.
    init: Mapping[str, Any] = field(default_factory=dict)

    @property
    def run_name(self) -> str:
        return self.key

    @property
    def parent_keys(self) -> tuple[str, ...]:
        return tuple(edge.key for edge in self.parents)

    def replace(self, **changes: Any) -> "Node":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for a Ray trial's config (JSON-able); :meth:`from_dict` reads it back."""
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                "params": dict(self.params), "grid_point": dict(self.grid_point), "init": dict(self.init),
                "parents": [[edge.role, edge.key] for edge in self.parents], "resources": self.resources.as_dict()}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "Node":
        return cls(**{**raw, "parents": tuple(Edge(role, key) for role, key in raw["parents"]),
                      "resources": Resources(**raw["resources"])})


@dataclass(frozen=True)
class StageGraph:
    nodes: Mapping[str, Node]  # key -> node, in topological order

    def with_resources(self, resources: Mapping[str, Resources]) -> "StageGraph":
        """The same graph with each node's resources replaced (as fitted to a cluster); hashes unchanged."""
        return StageGraph(nodes={k: n.replace(resources=resources.get(k, n.resources)) for k, n in self.nodes.items()})

    def children(self, key: str) -> list[str]:
        return [k for k, n in self.nodes.items() if key in n.parent_keys]

    @property
    def identity(self) -> str:
        """The grid's content hash: the same nodes (each with its content hash) give the same identity,
        whatever the resources, DDP workers or invocation. MLflow keeps one parent run per identity."""
        return _hash({"nodes": sorted(n.hash for n in self.nodes.values())})

    def descendants(self, key: str) -> set[str]:
        found: set[str] = set()
        stack = [key]
        while stack:
            for child in self.children(stack.pop()):
                if child not in found:
                    found.add(child)
                    stack.append(child)
        return found

    def critical_path(self) -> dict[str, float]:
        """For each node, its cost plus the costliest chain of descendants below it."""
        below: dict[str, float] = {}
        for key in reversed(list(self.nodes)):
            node = self.nodes[key]
            below[key] = node.cost + max((below[c] for c in self.children(key)), default=0.0)
        return below


def _hash(payload: Mapping[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _grid_suffix(point: Mapping[str, Any]) -> str:
    return "[" + ",".join(f"{k}={v}" for k, v in point.items()) + "]" if point else ""


def _grid_points(specs: list[TrainSpec]) -> list[dict[str, Any]]:
    """The fields that vary across a stage's grid, per point (empty dicts when there is no grid)."""
    dicts = [{**{k: v for k, v in s.to_dict().items() if k != "extra"}, **dict(s.extra)} for s in specs]
    varying = [k for k in dicts[0] if len({json.dumps(d[k]) for d in dicts}) > 1]
    return [{k: d[k] for k in varying} for d in dicts]


def expand_graph(
    preset: Preset,
    tasks: Iterable[str],
    archs: Iterable[str],
    *,
    seeds: int = 1,
    train_sizes: Mapping[str, int],
    data_fingerprints: Mapping[str, str],
    resources: Mapping[str, Resources] | None = None,
    weights: Mapping[str, WeightsFile] | None = None,
    from_scratch: bool = False,
) -> StageGraph:
    """Expand the grid into nodes in topological order.

    ``train_sizes`` / ``data_fingerprints``: per task, the number of training images (cost model) and
    a fingerprint of the prepared data (part of every hash). ``resources``: per architecture and for
    "fusion" / "significance"; defaults come from :func:`default_resources`. ``weights``: the local file
    of each pre-trained weights name the preset's teachers start from; ``from_scratch`` trains every
    teacher from random initialisation instead (a ValueError names weights that are neither).
    """
    tasks, archs = list(tasks), list(archs)
    builder = _GraphBuilder(preset, {**default_resources(preset, archs), **(resources or {})}, train_sizes,
                            data_fingerprints, weights or {}, from_scratch)
    for seed in range(seeds):
        suffix = f"/seed{seed}" if seeds > 1 else ""
        for task in tasks:
            chains = [builder.add_chain(task, arch, seed, suffix) for arch in archs]
            builder.add_significance(task, seed, suffix, chains)
    return StageGraph(nodes=builder.nodes)


class _GraphBuilder:
    """Adds nodes in topological order, each hashed from its spec, data and parents' hashes."""

    def __init__(self, preset: Preset, resources: Mapping[str, Resources], train_sizes: Mapping[str, int],
                 data_fingerprints: Mapping[str, str], weights: Mapping[str, WeightsFile], from_scratch: bool) -> None:
        self.preset, self.resources, self.train_sizes = preset, resources, train_sizes
        self.data_fingerprints, self.weights, self.from_scratch = data_fingerprints, weights, from_scratch
        self.nodes: dict[str, Node] = {}

    def add(self, node: Node) -> Node:
        # "strategy": the stage's first name, kept in the hashed payload (and in params, StageSpec.to_dict):
        # renaming the key would change every hash and re-run every sealed node on users' storage.
        payload = {"version": GRAPH_VERSION, "kind": node.kind, "strategy": node.stage, "params": node.params,
                   "parents": [self.nodes[p].hash for p in node.parent_keys],
                   "data": self.data_fingerprints[node.task]}
        if node.init:
            payload["init"] = {k: v for k, v in node.init.items() if k not in ("file", "input_mean")}
        node = node.replace(hash=_hash(payload))
        if node.key in self.nodes:
            raise ValueError(f"duplicate node key {node.key}")
        self.nodes[node.key] = node
        return node

    def add_chain(self, task: str, arch: str, seed: int, suffix: str) -> tuple[Edge, Edge]:
        """The curriculum of one task × architecture (spec §5), its stages read from the registry: the
        teacher on full faces, the main and ablation students from it, every distilled stage from the
        main student (one node per grid point) and, unless the preset turns them off, its teacher-free
        control from the same student (no teacher edge), and fusion. Returns the main student and fusion
        edges."""
        preset, info = self.preset, get_task(task)
        settings = preset.arch(arch)
        per_image = get_architecture(arch).cost * (settings.input_size / 224) ** 2 * settings.width_mult ** 2

        def train_node(name: str, stage: str, visible: str, faces: str, parents: tuple[Edge, ...],
                       spec: TrainSpec, point: Mapping[str, Any], init: Mapping[str, Any] | None = None) -> Node:
            """A node called ``name`` (its key's stage part: the ablation student is its own) that trains
            the registry's ``stage``."""
            stage_spec = StageSpec(task=task, arch=arch, stage=stage, train_visible=visible,
                                   input_size=settings.input_size, width_mult=settings.width_mult, train=spec,
                                   seed=seed, dropout=settings.dropout)
            return self.add(Node(key=f"{task}/{arch}/{name}{_grid_suffix(point)}{suffix}", kind="train",
                                 task=task, arch=arch, stage=name, train_faces=faces, seed=seed,
                                 params=stage_spec.to_dict(), parents=parents, resources=self.resources[arch],
                                 cost=spec.epochs * self.train_sizes[task] * per_image * get_stage(stage).cost,
                                 grid_point=dict(point), init=dict(init or {})))

        first, second = stage_starting_from("weights"), stage_starting_from("teacher")
        teacher = train_node(first, first, "full", "full", (), preset.train_spec(task, arch, first), {},
                             teacher_init(preset, task, arch, self.weights, self.from_scratch))
        from_teacher = (Edge("teacher", teacher.key),)
        student_spec = preset.train_spec(task, arch, second)
        main = train_node(second, second, info.main_visible, info.main_visible, from_teacher, student_spec, {})
        train_node(second + ABLATION_SUFFIX, second, info.ablation_visible, info.ablation_visible, from_teacher,
                   student_spec, {})
        distilled: list[Edge] = []
        for stage in (s for s in distilled_stages() if preset.has_stage(task, arch, s)):
            specs = preset.grid(task, arch, stage)
            for spec, point in zip(specs, _grid_points(specs)):
                node = train_node(stage, stage, info.main_visible, f"full+{info.main_visible}",
                                  (*from_teacher, Edge("student", main.key)), spec, point)
                distilled.append(Edge(stage, node.key))
        for stage in (s for s in control_stages() if preset.controls and preset.has_stage(task, arch, s)):
            specs = preset.grid(task, arch, stage)  # the distilled stage's points, teacher settings dropped
            for spec, point in zip(specs, _grid_points(specs)):
                node = train_node(stage, stage, info.main_visible, info.main_visible,
                                  (Edge("student", main.key),), spec, point)
                distilled.append(Edge(stage, node.key))
        fusion_spec = FusionSpec(Cs=preset.fusion_Cs, visible=info.main_visible, kind=info.kind,
                                 svr_kernels=preset.svr_kernels if info.kind == "regression" else None)
        fusion = self.add(Node(key=f"{task}/{arch}/fusion{suffix}", kind="fusion", task=task, arch=arch,
                               stage="fusion", train_faces=f"full+{info.main_visible}", seed=seed,
                               params=fusion_spec.to_dict(),
                               parents=(Edge("student", main.key), *distilled), resources=self.resources["fusion"],
                               cost=self.train_sizes[task] * 1e-3))
        return Edge("student", main.key), Edge("fusion", fusion.key)

    def add_significance(self, task: str, seed: int, suffix: str, chains: list[tuple[Edge, Edge]]) -> None:
        """The task's comparisons of every network's distilled and fused models with its student (spec §12)."""
        students, fusions = [student for student, _ in chains], [fusion for _, fusion in chains]
        self.add(Node(key=f"{task}/significance{suffix}", kind="significance", task=task, arch=None,
                      stage="significance", train_faces="-", seed=seed,
                      params=SignificanceSpec(visible=get_task(task).main_visible).to_dict(),
                      parents=(*students, *fusions), resources=self.resources["significance"], cost=1.0))


def teacher_init(preset: Preset, task: str, arch: str, weights: Mapping[str, WeightsFile],
                 from_scratch: bool) -> dict[str, Any]:
    """Where the teacher of ``task`` × ``arch`` starts: the preset's weights (their file, and the input mean
    the file names, which the teacher subtracts) or from scratch."""
    name = preset.teacher_weights(task, arch)
    if name == FROM_SCRATCH or from_scratch:
        return {"weights": FROM_SCRATCH}
    if name not in weights:
        raise ValueError(f"preset {preset.name!r} starts the {task}/{arch} teacher from {name} weights: pass "
                         f"--weights {name}=PATH, or --from-scratch")
    found = weights[name]
    init: dict[str, Any] = {"weights": name, "sha256": found.sha256, "file": found.path}
    if found.input_mean is not None:
        init["input_mean"] = list(found.input_mean)
    return init


def default_resources(preset: Preset, archs: Iterable[str]) -> dict[str, Resources]:
    """Per-architecture resources from the preset's ``resources`` section (CPU-only defaults). An entry that
    sets ``workers`` without ``max_ddp_workers`` fixes the DDP worker count there; one that sets neither lets
    the grid choose it (``max_ddp_workers`` 0)."""
    table = dict(preset.resources)

    def arch_resources(entry: Mapping[str, float]) -> Resources:
        workers = int(entry.get("workers", 1))
        max_ddp_workers = int(entry.get("max_ddp_workers", workers if "workers" in entry else 0))
        return Resources(cpus=float(entry.get("cpus", 1.0)), gpus=float(entry.get("gpus", 0.0)), workers=workers,
                         max_ddp_workers=max_ddp_workers)

    out = {arch: arch_resources(table.get(arch, {})) for arch in archs}
    out["fusion"] = arch_resources(table.get("fusion", {}))
    out["significance"] = arch_resources(table.get("significance", {}))
    return out


def describe_graph(graph: StageGraph, ray_train: str = "multi-worker-only") -> str:
    """A readable listing of the graph for ``--dry-run``: per node its hash, the resources it asks for (as
    given: grid.cluster_plan fits them to the cluster first), whether it trains through Ray Train under the resolved
    ``ray_train`` mode ("always" or "multi-worker-only"), and its parents."""
    lines = []
    counts: dict[str, int] = {}
    for node in graph.nodes.values():
        counts[node.stage] = counts.get(node.stage, 0) + 1
        res = node.resources
        gpu = f" gpu={res.gpus:g}" if res.gpus else ""
        workers = f" workers={res.workers}" if res.workers > 1 else ""
        if node.kind == "train":
            workers += " via=ray-train" if ray_train == "always" or res.workers > 1 else " via=trial"
        parents = ", ".join(node.parent_keys) if node.parents else "-"
        if node.init:
            sha = f" sha256 {node.init['sha256'][:12]}" if "sha256" in node.init else ""
            parents = f"{node.init['weights']}{sha}"
        lines.append(f"{node.key:<52} {node.hash}  cpu={res.cpus:g}{gpu}{workers}  <- {parents}")
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    return "\n".join(lines + [f"{len(graph.nodes)} nodes: {summary}"])
