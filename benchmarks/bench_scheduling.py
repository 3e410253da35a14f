"""Scheduling the full paper grid on a simulated 4-node × 8-GPU cluster (issue 5, target 3).

Ray's ``cluster_utils.Cluster`` starts four raylets on this machine, each declaring 8 GPUs and 64
CPUs that do not exist (logical resources schedule like real ones). The grid's own scheduling code
runs unchanged: the stage graph of the ``paper`` preset for every task × architecture (``expand_graph``),
its per-node requests (``trial_resources``: VGG-f half a GPU, VGG-face and ResNet-50 one), the
critical-path ``DependencySearcher`` and ``max_concurrency``. Only the node body is replaced: each
trial sleeps for its node's duration under the cost model that ``expand_graph`` attaches to every node
(epochs × training images × architecture cost × strategy cost), scaled so that the lower bound lasts
``--lower-bound`` seconds (a node holding half a GPU runs at the same speed as one holding a whole GPU:
the cost model counts work per node, not per GPU).

Lower bound = max(critical path, total GPU-seconds ÷ 32 GPUs). The same graph is then run with stage
barriers instead (every teacher, then every student, then every KD node, then fusion, then the
significance tests; a stage starts when the whole previous stage is done), the schedule a
stage-by-stage script gets. Both schedules are also computed without Ray by a list-scheduling
simulation of the same policy, which shows what Ray's per-trial overhead adds.

    python benchmarks/bench_scheduling.py                 # ~2 × 4 min
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_line, markdown_table  # noqa: E402
from grid.graph import ABLATION_SUFFIX, Edge, StageGraph, default_resources, expand_graph  # noqa: E402
from occkd_core.presets import load_preset  # noqa: E402
from occkd_core.stages import get_stage  # noqa: E402
from occkd_core.models import ARCHITECTURES  # noqa: E402
from occkd_core.tasks import TASKS  # noqa: E402

NUM_NODES, GPUS_PER_NODE, CPUS_PER_NODE = 4, 8, 64
#: Training images per task in the papers (spec §2): FER+ 25,045 + capped AffectNet 88,021 (joint
#: training, spec §15 #15); UTKFace 14,213.
PAPER_TRAIN_SIZES = {"fer": 25045 + 88021, "gender": 14213, "age": 14213}
#: Barrier level of each node: its stage's starting point (weights 0, teacher 1, student 2), then fusion
#: and significance.
STARTS_LEVEL = {"weights": 0, "teacher": 1, "student": 2}


def stage_level(strategy: str) -> int:
    if strategy in ("fusion", "significance"):
        return 3 if strategy == "fusion" else 4
    return STARTS_LEVEL[get_stage(strategy.removesuffix(ABLATION_SUFFIX)).starts_from]


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
        levels.setdefault(stage_level(node.strategy), []).append(key)
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


def simulate(graph: StageGraph, seconds: dict[str, float], num_nodes: int = NUM_NODES) -> float:
    """Makespan of the searcher's policy without Ray: ready nodes in critical-path order, each placed on
    the first cluster node with room for its CPUs and GPU share (no per-trial overhead)."""
    priority = graph.critical_path()
    free = [[CPUS_PER_NODE, GPUS_PER_NODE] for _ in range(num_nodes)]
    done: set[str] = set()
    pending = sorted(graph.nodes, key=lambda k: -priority[k])
    running: list[tuple[float, str, int]] = []
    now = 0.0
    while pending or running:
        started = True
        while started:
            started = False
            for key in pending:
                node = graph.nodes[key]
                if not all(p in done for p in node.parent_keys):
                    continue
                res = node.resources
                slot = next((i for i, (c, g) in enumerate(free) if c >= res.cpus and g >= res.gpus - 1e-9), None)
                if slot is None:
                    continue
                free[slot][0] -= res.cpus
                free[slot][1] -= res.gpus
                heapq.heappush(running, (now + seconds[key], key, slot))
                pending.remove(key)
                started = True
                break
        now, key, slot = heapq.heappop(running)
        free[slot][0] += graph.nodes[key].resources.cpus
        free[slot][1] += graph.nodes[key].resources.gpus
        done.add(key)
    return now


def run_on_ray(graph: StageGraph, seconds: dict[str, float], storage: Path, reuse_actors: bool) -> dict[str, float]:
    """Makespan of the real searcher and resource requests on the simulated cluster, sleeping trials."""
    import ray
    from ray import tune

    from grid.scheduler import DependencySearcher, RunSettings, max_concurrency, trial_resources

    def sleeping_node(config: dict) -> None:
        time.sleep(config["node"]["sleep_s"])

    resources = {k: n.resources for k, n in graph.nodes.items()}
    nodes = {k: n.replace(params={}) for k, n in graph.nodes.items()}  # keep configs small
    slim = StageGraph(nodes=nodes)
    settings = RunSettings(storage=str(storage), data_paths={})
    searcher = DependencySearcher(slim, list(slim.nodes), set(), settings)
    config_of = searcher._config

    def config_with_sleep(key: str) -> dict:
        config = config_of(key)
        config["node"]["sleep_s"] = seconds[key]
        return config

    searcher._config = config_with_sleep  # the node body sleeps; everything else is the grid's own
    concurrency = max_concurrency(list(resources.values()), ray.cluster_resources())
    # The grid's requests, computed here: shipping trial_resources itself would make every trial process
    # import grid.scheduler and with it torch (~1 GB and seconds of CPU each on this 2-core machine).
    requests = {key: trial_resources(config_of(key)) for key in nodes}
    tuner = tune.Tuner(
        tune.with_resources(sleeping_node, resources=lambda config: requests[config["node"]["key"]]),
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(nodes), max_concurrent_trials=concurrency,
                                    reuse_actors=reuse_actors),
        run_config=tune.RunConfig(name=f"sched-{int(time.time())}", storage_path=str(storage), verbose=0),
    )
    start = time.time()
    tuner.fit()
    end = time.time()
    first_ready = min(searcher.ready_at.values())
    return {"makespan": end - start, "from_first_trial": max(searcher.completed_at.values()) - first_ready,
            "concurrency": concurrency}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lower-bound", type=float, default=240.0,
                        help="seconds the lower bound is scaled to (longer: Ray's per-trial overhead matters less)")
    parser.add_argument("--no-ray", action="store_true", help="only the list-scheduling simulation")
    parser.add_argument("--no-reuse-actors", action="store_true", help="start a new process for every trial")
    args = parser.parse_args(argv)
    graph = paper_graph()
    barrier_graph = with_barriers(graph)
    seconds, critical, work, bound = durations(graph, args.lower_bound)
    gpu_nodes = sum(1 for n in graph.nodes.values() if n.resources.gpus)
    print(machine_line())
    print(f"paper grid: {len(graph.nodes)} nodes ({gpu_nodes} on GPUs); simulated cluster {NUM_NODES} nodes × "
          f"{GPUS_PER_NODE} GPUs × {CPUS_PER_NODE} CPUs; critical path {critical:.1f} s, GPU work ÷ "
          f"{NUM_NODES * GPUS_PER_NODE} = {work:.1f} s, lower bound {bound:.1f} s")
    rows = []
    for name, g in (("dependency edges (grid)", graph), ("stage barriers", barrier_graph)):
        makespan = simulate(g, seconds)
        rows.append([name, f"{NUM_NODES}×{GPUS_PER_NODE} GPUs", "list simulation, no overhead", makespan,
                     f"{makespan / bound:.3f}"])
        print(" | ".join(str(v) for v in rows[-1]), flush=True)
    # Fewer GPUs make the total work, not the critical path, the bound: where barriers start to cost.
    for num_nodes in (2, 1):
        gpus = num_nodes * GPUS_PER_NODE
        small_bound = max(critical, work * NUM_NODES * GPUS_PER_NODE / gpus)
        for name, g in (("dependency edges (grid)", graph), ("stage barriers", barrier_graph)):
            makespan = simulate(g, seconds, num_nodes)
            rows.append([name, f"{num_nodes}×{GPUS_PER_NODE} GPUs", "list simulation, no overhead", makespan,
                         f"{makespan / small_bound:.3f}"])
    if not args.no_ray:
        os.environ.setdefault("RAY_enable_worker_prestart", "0")  # no idle process per logical CPU
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        import ray
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": CPUS_PER_NODE, "num_gpus": GPUS_PER_NODE})
        for _ in range(NUM_NODES - 1):
            cluster.add_node(num_cpus=CPUS_PER_NODE, num_gpus=GPUS_PER_NODE)
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        try:
            with tempfile.TemporaryDirectory() as tmp:
                for name, g in (("dependency edges (grid)", graph), ("stage barriers", barrier_graph)):
                    result = run_on_ray(g, seconds, Path(tmp), reuse_actors=not args.no_reuse_actors)
                    rows.append([name, f"{NUM_NODES}×{GPUS_PER_NODE} GPUs",
                                 f"Ray Tune on {NUM_NODES} raylets (≤ {result['concurrency']} trials at once)",
                                 result["makespan"], f"{result['makespan'] / bound:.3f}"])
                    print(" | ".join(str(v) for v in rows[-1]), flush=True)
        finally:
            ray.shutdown()
            cluster.shutdown()
    print()
    print(markdown_table(["schedule", "cluster", "how", "makespan s", "makespan ÷ lower bound"], rows))
    print("\ntarget for the grid on Ray: <= 1.15")
    return 0


if __name__ == "__main__":
    sys.exit(main())
