"""Scheduling the full paper grid on simulated 4, 2 and 1 machines × 8 GPUs, with and without chosen DDP workers
(issue 13).

Ray's ``cluster_utils.Cluster`` starts one raylet per machine on this computer, each declaring 8 GPUs and
64 CPUs that do not exist (logical resources schedule like real ones). The grid's own scheduling code
runs unchanged: the stage graph of the ``paper`` preset for every task × architecture (``expand_graph``),
its per-node requests (VGG-f half a GPU, VGG-face and ResNet-50 one), the critical-path
``DependencySearcher`` with ``ClusterCapacity`` and, for the "workers" schedule, ``WorkersPolicy``
(grid/ddp_workers.py), which gives nodes on the chains that bound the makespan several DDP workers (a GPU
each). Only the node body is replaced: each trial holds its node's resources (a node with w workers: w
bundles of one GPU, packed on one machine, as its Train workers would be) and sleeps for its node's
duration under the cost model that ``expand_graph`` attaches to every node (epochs × training images ×
architecture cost × stage cost), divided by the speed-up of its w workers: w × the scaling efficiency of
grid.ddp_workers.EFFICIENCY_AT_8 (justified there; ``--efficiency-scale 0.5`` halves it at 8 GPUs).
Durations are scaled so that the one-GPU-per-node lower bound on 4 × 8 GPUs (its critical path) lasts
``--lower-bound`` seconds.

Bounds reported per run: the *work bound* (GPU work at one worker per node ÷ GPUs: no schedule, at any
worker counts, can beat it) and the *bound at the chosen workers* (max of the GPU-seconds the run held ÷
GPUs and its critical path with each node at the worker count it got). Every schedule is also run without Ray by driving
the same searcher through a list-scheduling simulation (no per-trial overhead; placement as the
searcher's capacity model packs it), and the one-GPU schedule with stage barriers (issue 5) is
simulated for reference.

    python benchmarks/bench_scheduling.py                 # ~25 min: 6 runs on Ray
    python benchmarks/bench_scheduling.py --no-ray        # seconds: the simulations only
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_line, markdown_table  # noqa: E402
from grid.graph import ABLATION_SUFFIX, Edge, StageGraph, default_resources, expand_graph  # noqa: E402
from occkd_core.presets import load_preset  # noqa: E402
from occkd_core.stages import get_stage  # noqa: E402
from occkd_core.models import ARCHITECTURES  # noqa: E402
from occkd_core.tasks import TASKS  # noqa: E402
from grid.ddp_workers import EFFICIENCY_AT_8, WorkersPolicy, speedup  # noqa: E402

if TYPE_CHECKING:
    from grid.searcher import DependencySearcher

NUM_NODES, GPUS_PER_NODE, CPUS_PER_NODE = 4, 8, 64
#: Training images per task in the papers (spec §2): FER+ 25,045 + capped AffectNet 88,021 (joint
#: training, spec §15 #15); UTKFace 14,213.
PAPER_TRAIN_SIZES = {"fer": 25045 + 88021, "gender": 14213, "age": 14213}
#: Barrier level of each node: its stage's starting point (weights 0, teacher 1, student 2), then fusion
#: and significance.
STARTS_LEVEL = {"weights": 0, "teacher": 1, "student": 2}


def stage_level(stage: str) -> int:
    if stage in ("fusion", "significance"):
        return 3 if stage == "fusion" else 4
    return STARTS_LEVEL[get_stage(stage.removesuffix(ABLATION_SUFFIX)).starts_from]


def paper_graph() -> StageGraph:
    preset = load_preset("paper")
    return expand_graph(preset, TASKS, ARCHITECTURES, train_sizes=PAPER_TRAIN_SIZES,
                        data_fingerprints={t: "paper" for t in TASKS},
                        resources=default_resources(preset, ARCHITECTURES),
                        from_scratch=True)  # where teachers start changes hashes, not the cost model


def with_barriers(graph: StageGraph) -> StageGraph:
    """The same nodes, each depending on every node of the stage before it."""
    levels: dict[int, list[str]] = {}
    for key, node in graph.nodes.items():
        levels.setdefault(stage_level(node.stage), []).append(key)
    nodes = {}
    for level in sorted(levels):  # topological order: stage by stage
        for key in levels[level]:
            barrier = tuple(Edge("barrier", parent) for parent in levels.get(level - 1, []))
            nodes[key] = graph.nodes[key].replace(parents=barrier)
    return StageGraph(nodes=nodes)


def durations(graph: StageGraph, lower_bound_s: float) -> tuple[dict[str, float], float, float, float]:
    """Seconds per node, scaled so that max(critical path, GPU work ÷ GPUs) = ``lower_bound_s``;
    also the critical path, the work bound and the lower bound in those seconds."""
    gpus = NUM_NODES * GPUS_PER_NODE
    critical = max(graph.critical_path().values())
    work = sum(n.cost * n.resources.gpus for n in graph.nodes.values()) / gpus
    scale = lower_bound_s / max(critical, work)
    return ({k: n.cost * scale for k, n in graph.nodes.items()}, critical * scale, work * scale, lower_bound_s)


def node_seconds(graph: StageGraph, seconds: dict[str, float], key: str, resources: dict, policy: WorkersPolicy) -> float:
    """How long a node runs with the resources it was handed: its one-worker duration ÷ its workers' speed-up."""
    workers = int(resources["workers"])
    arch = graph.nodes[key].arch
    return seconds[key] / speedup(policy.efficiency(arch), workers) if workers > 1 and arch else seconds[key]


def make_searcher(graph: StageGraph, machines: int, choose_workers: bool, policy: WorkersPolicy, storage: str,
                  read_nodes=None) -> "DependencySearcher":
    """The grid's searcher over ``graph``, admitting by the grid's capacity model of ``machines`` × 8 GPUs
    (or of the live Ray nodes), choosing DDP workers when ``choose_workers``."""
    from grid.bundles import HEAD
    from grid.capacity import ClusterCapacity
    from grid.searcher import DependencySearcher, RunSettings

    if read_nodes is None:
        layout = [{"CPU": float(CPUS_PER_NODE), "GPU": float(GPUS_PER_NODE)} for _ in range(machines)]
        layout[0][HEAD] = 1.0
        read_nodes = lambda: layout  # noqa: E731
    settings = RunSettings(storage=storage, data_paths={}, ray_train="always", machine_gpus=float(GPUS_PER_NODE))
    nodes = {k: n.replace(params={"train": {"batch_size": n.params["train"]["batch_size"]}} if n.kind == "train"
                          else {}) for k, n in graph.nodes.items()}  # keep trial configs small
    return DependencySearcher(StageGraph(nodes=nodes), list(nodes), set(), settings,
                              capacity=ClusterCapacity(read_nodes=read_nodes, refresh_s=0.0),
                              workers_policy=policy if choose_workers else None)


@dataclass
class Schedule:
    """What one schedule did: when each node started and ended, and what it held."""

    makespan: float
    spans: dict[str, tuple[float, float]]  # node key -> (start, end), from the first start
    gpus: dict[str, float]  # node key -> GPUs held
    workers: dict[str, int]

    def gpu_seconds(self) -> float:
        return sum(self.gpus[k] * (end - start) for k, (start, end) in self.spans.items())

    def critical_path(self, graph: StageGraph) -> float:
        """The longest chain with each node at the duration it ran."""
        below: dict[str, float] = {}
        for key in reversed(list(graph.nodes)):
            start, end = self.spans[key]
            below[key] = (end - start) + max((below[c] for c in graph.children(key)), default=0.0)
        return max(below.values())


def simulate(graph: StageGraph, seconds: dict[str, float], machines: int, choose_workers: bool,
             policy: WorkersPolicy) -> Schedule:
    """List scheduling driven by the grid's own searcher, without Ray: whenever a node ends, the searcher
    is asked for nodes until it has none, each starting at once for its duration at its worker count."""
    searcher = make_searcher(graph, machines, choose_workers, policy, storage="/nowhere")
    running: list[tuple[float, str, str]] = []  # (end, key, trial id)
    spans, gpus, chosen = {}, {}, {}
    now, count = 0.0, 0
    while True:
        while True:
            config = searcher.suggest(f"t{count}")
            if not isinstance(config, dict):
                break
            key, res = config["node"]["key"], config["node"]["resources"]
            end = now + node_seconds(graph, seconds, key, res, policy)
            heapq.heappush(running, (end, key, f"t{count}"))
            spans[key], gpus[key], chosen[key] = (now, end), res["gpus"] * res["workers"], int(res["workers"])
            count += 1
        if not running:
            break
        now, key, trial_id = heapq.heappop(running)
        searcher.on_trial_complete(trial_id)
    return Schedule(makespan=now, spans=spans, gpus=gpus, workers=chosen)


def run_on_ray(graph: StageGraph, seconds: dict[str, float], storage: Path, choose_workers: bool,
               policy: WorkersPolicy) -> Schedule:
    """The same searcher handing nodes to Ray Tune on the simulated cluster; each trial holds its node's
    resources and sleeps."""
    import ray
    from ray import tune

    from grid.bundles import worker_placement
    from grid.capacity import live_nodes, max_concurrency

    def sleeping_node(config: dict) -> None:
        # As in the grid: a training node's trial holds only a sliver of the head, and its workers' bundles
        # are a placement group of their own (TorchTrainer's), w bundles of one GPU packed on one machine;
        # the node runs once Ray has placed that group. Other nodes hold their CPUs in the trial.
        group = None
        if config["node"]["kind"] == "train":
            from ray.util.placement_group import placement_group

            res = config["node"]["resources"]
            bundle = {"CPU": float(res["cpus"]), **({"GPU": float(res["gpus"])} if res["gpus"] else {})}
            workers = int(res["workers"])
            group = placement_group([dict(bundle) for _ in range(workers)],
                                    strategy=config["placement_strategy"])
            ray.get(group.ready())
        started = time.time()
        record = Path(config["starts"]) / config["node"]["hash"]
        record.write_text(f"{started} {ray.get_runtime_context().get_node_id()}")
        time.sleep(config["node"]["sleep_s"])
        if group is not None:
            ray.util.remove_placement_group(group)

    def held(config: dict) -> tune.PlacementGroupFactory:
        # Defined here, not the grid's grid.bundles.trial_resources: when this was written, shipping the grid's
        # module made every trial process import torch.
        if config["node"]["kind"] == "train":
            return tune.PlacementGroupFactory([{"node:__internal_head__": 0.001}])
        return tune.PlacementGroupFactory([{"CPU": float(config["node"]["resources"]["cpus"])}])

    searcher = make_searcher(graph, 0, choose_workers, policy, storage=str(storage), read_nodes=live_nodes)
    starts = storage / f"starts-{int(time.time())}"  # each trial's start and Ray node, for the waits
    starts.mkdir()
    config_of = searcher._config

    def config_with_sleep(key: str) -> dict:
        config = config_of(key)
        config["node"]["sleep_s"] = node_seconds(graph, seconds, key, config["node"]["resources"], policy)
        config["starts"] = str(starts)
        config["placement_strategy"] = worker_placement(config["node"]["resources"], float(GPUS_PER_NODE))
        return config

    searcher._config = config_with_sleep  # the node body sleeps; everything else is the grid's own
    concurrency = max_concurrency([n.resources for n in graph.nodes.values()], ray.cluster_resources())
    tuner = tune.Tuner(
        tune.with_resources(sleeping_node, resources=held),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(graph.nodes), max_concurrent_trials=concurrency,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name=f"sched-{int(time.time())}", storage_path=str(storage), verbose=0),
    )
    started = time.time()
    tuner.fit()
    ended = time.time()
    first = min(searcher.ready_at.values())
    began = {k: float((starts / n.hash).read_text().split()[0]) for k, n in graph.nodes.items()}
    # A node's span: from holding its GPUs (its workers' group placed) to Tune seeing it done.
    spans = {k: (began[k] - first, searcher.completed_at[k] - first) for k in graph.nodes}
    res = searcher.resources
    waits = sorted((began[k] - searcher.ready_at[k], k) for k in graph.nodes)
    print(f"  handed out -> trial started: median {waits[len(waits) // 2][0]:.1f} s, longest "
          + ", ".join(f"{k} {w:.1f} s ({res[k].workers} workers)" for w, k in waits[-5:]), flush=True)
    return Schedule(makespan=ended - started, spans=spans, gpus={k: r.gpus * r.workers for k, r in res.items()},
                    workers={k: r.workers for k, r in res.items()})


def describe(name: str, machines: int, how: str, run: Schedule, graph: StageGraph, work1: float,
             one_gpu: float | None) -> list:
    """One table row: the makespan against both bounds, the speed-up on one GPU per node, GPU use."""
    gpus = machines * GPUS_PER_NODE
    held = run.gpu_seconds()
    at_chosen = max(held / gpus, run.critical_path(graph))
    wide = sum(1 for w in run.workers.values() if w > 1)
    return [name, f"{machines}×{GPUS_PER_NODE}", how, run.makespan, work1 / gpus, at_chosen,
            f"{run.makespan / at_chosen:.2f}", f"{run.makespan / (work1 / gpus):.2f}",
            f"{one_gpu / run.makespan:.2f}×" if one_gpu else "1", f"{held / (gpus * run.makespan):.0%}",
            f"{work1 / (gpus * run.makespan):.0%}", wide]


HEADERS = ["schedule", "GPUs", "how", "makespan s", "work bound s", "bound at chosen workers s",
           "÷ bound at chosen workers", "÷ work bound", "speed-up", "GPUs held", "useful", "nodes with >1 worker"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lower-bound", type=float, default=240.0,
                        help="seconds the one-GPU lower bound on 4 × 8 GPUs is scaled to (longer: Ray's per-trial "
                             "overhead matters less)")
    parser.add_argument("--machines", default="4,2,1", help="cluster sizes to run, in machines of 8 GPUs")
    parser.add_argument("--efficiency-scale", type=float, default=1.0,
                        help="multiply every architecture's scaling efficiency at 8 GPUs (sensitivity)")
    parser.add_argument("--no-ray", action="store_true", help="only the list-scheduling simulations")
    parser.add_argument("--ray-schedules", default="one,workers",
                        help="which schedules to run on Ray: one (one GPU per node), workers (DDP workers chosen)")
    args = parser.parse_args(argv)
    machines_list = [int(m) for m in args.machines.split(",")]
    policy = WorkersPolicy(machine_gpus=GPUS_PER_NODE, efficiency_at_8=tuple(
        (arch, e * args.efficiency_scale) for arch, e in EFFICIENCY_AT_8.items()))
    graph = paper_graph()
    seconds, critical, work, bound = durations(graph, args.lower_bound)
    work1 = work * NUM_NODES * GPUS_PER_NODE  # GPU-seconds at one worker per node
    print(machine_line())
    print(f"paper grid: {len(graph.nodes)} nodes; critical path at one GPU per node {critical:.1f} s, GPU work "
          f"{work1:.0f} GPU-s; scaling efficiency at 8 GPUs {dict(policy.efficiency_at_8)}")
    rows = []
    for machines in machines_list:
        one = simulate(graph, seconds, machines, choose_workers=False, policy=policy)
        wide = simulate(graph, seconds, machines, choose_workers=True, policy=policy)
        barriers = simulate(with_barriers(graph), seconds, machines, choose_workers=False, policy=policy)
        rows.append(describe("one GPU per node, stage barriers", machines, "simulation", barriers, graph, work1, None))
        rows.append(describe("one GPU per node", machines, "simulation", one, graph, work1, None))
        rows.append(describe("**chosen workers**", machines, "simulation", wide, graph, work1, one.makespan))
        for row in rows[-3:]:
            print(" | ".join(str(v) for v in row), flush=True)
    if not args.no_ray:
        os.environ.setdefault("RAY_enable_worker_prestart", "0")  # no idle process per logical CPU
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        import ray
        from ray.cluster_utils import Cluster

        for machines in machines_list:
            cluster = Cluster(initialize_head=True,
                              head_node_args={"num_cpus": CPUS_PER_NODE, "num_gpus": GPUS_PER_NODE})
            for _ in range(machines - 1):
                cluster.add_node(num_cpus=CPUS_PER_NODE, num_gpus=GPUS_PER_NODE)
            ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    one_makespan = None
                    if "one" in args.ray_schedules:
                        one = run_on_ray(graph, seconds, Path(tmp), choose_workers=False, policy=policy)
                        one_makespan = one.makespan
                        rows.append(describe("one GPU per node", machines, "Ray Tune", one, graph, work1, None))
                        print(" | ".join(str(v) for v in rows[-1]), flush=True)
                    if "workers" in args.ray_schedules:
                        wide = run_on_ray(graph, seconds, Path(tmp), choose_workers=True, policy=policy)
                        rows.append(describe("**chosen workers**", machines, "Ray Tune", wide, graph, work1, one_makespan))
                        print(" | ".join(str(v) for v in rows[-1]), flush=True)
            finally:
                ray.shutdown()
                cluster.shutdown()
    print()
    print(markdown_table(HEADERS, rows))
    print("\ntargets (chosen workers, 4×8): ≤ 1.2 × the bound at chosen workers, ≥ 3× the one-GPU schedule, GPUs held ≥ 60 %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
