"""The driver: from a checked :class:`grid.spec.GridSpec` to an exit status. It checks the inputs before
anything is written, prepares the data, holds the storage's lock, expands the stage graph, resumes the nodes
sealed on storage, runs the rest as one Tune experiment on Ray (:mod:`grid.searcher` hands out the nodes,
:func:`grid.trials.run_node_trial` runs each), records them in MLflow and ends with :mod:`grid.outcome`."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from grid import storage_lock
from grid.artifacts import ARTIFACTS, StorageLayout, node_dir, read_result
from grid.cluster_plan import cluster_now, fit_preset_resources, plan_cluster
from grid.code import code_fingerprint
from grid.data import PreparedData, prepare_data
from grid.faults import fault_injection
from grid.graph import StageGraph, describe_graph, expand_graph
from grid.outcome import RayOutcome, leave_interrupted, write_interrupted, write_outputs
from grid.progress import Progress
from grid.results import NodeResult, ResultFormatError
from grid.ray_token import init_ray
from grid.spec import GridSpec
from grid.weights import resolve_weights, stage_weights


def run_grid(spec: GridSpec, interrupts: Any) -> int:
    """Check the inputs, prepare the data, take the storage's lock and run the grid (``spec.dry_run``: print its
    graph and plan instead); the exit status. ``interrupts``: the installed :class:`grid.interrupts.Interrupts`,
    None for a dry run."""
    lock = None
    if not spec.dry_run:
        from grid.tracking_store import check_tracking_uri, default_tracking_uri

        spec = dataclasses.replace(spec, tracking_uri=spec.tracking_uri or default_tracking_uri(Path.cwd()))
        try:
            check_tracking_uri(spec.tracking_uri)
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    try:
        weights = resolve_weights(spec.preset, list(spec.tasks), list(spec.archs), spec.weights, spec.from_scratch)
        if not spec.dry_run and not spec.ray_address:
            # A request no node of this machine (or its --cluster-config node types) can hold, refused before
            # anything is written; run_on_ray fits the requests again on the Ray it starts.
            fit_preset_resources(spec, cluster_now(spec, connect=False)[1])
        if not spec.dry_run:
            # The data checked as --dry-run checks it (split sizes from the sources' labels) before anything
            # is written; prepare_data below checks the converted store again.
            prepare_data(spec.preset, list(spec.tasks), spec.storage, spec.data_root, write=False, archs=spec.archs)
            try:
                spec.storage.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ValueError(f"--storage {str(spec.storage)!r}: cannot create it ({err.strerror})") from None
            lock = storage_lock.acquire(spec.storage, wait=spec.wait, on_wait=lambda holder: print(
                f"waiting for the grid running on this storage ({storage_lock.describe_holder(holder)}) ...",
                flush=True))
            weights = stage_weights(weights, spec.storage)
        prepared = prepare_data(spec.preset, list(spec.tasks), spec.storage, spec.data_root, write=not spec.dry_run,
                                archs=spec.archs)
    except (ValueError, OSError, storage_lock.StorageBusy) as err:
        print(f"error: {err}", file=sys.stderr)
        if lock is not None:
            lock.release()
        return 2
    graph = expand_graph(spec.preset, spec.tasks, spec.archs, seeds=spec.seeds,
                         train_sizes={t: p.num_train for t, p in prepared.items()},
                         data_fingerprints={t: p.fingerprint for t, p in prepared.items()},
                         weights=weights, from_scratch=spec.from_scratch)
    if spec.dry_run:
        import ray

        try:
            if spec.ray_address:  # the resources this cluster (and its autoscaler) will be asked for
                init_ray(spec.ray_address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            plan = plan_cluster(spec, graph, connect=spec.ray_address is not None)
        except ValueError as err:  # no token for the cluster, or a request no node of it can ever hold
            print(f"error: {err}", file=sys.stderr)
            return 2
        finally:
            if spec.ray_address:
                ray.shutdown()
        print(describe_graph(plan.graph, ray_train=plan.ray_train))
        print("\n".join(plan.lines))
        return 0
    try:
        return run_graph(spec, graph, prepared, interrupts)
    finally:
        lock.release()


def run_graph(spec: GridSpec, graph: StageGraph, prepared: Mapping[str, PreparedData], interrupts: Any = None) -> int:
    """Resume what is done, run the rest on Ray, write the report; the exit status (0, 1: nodes failed, 2;
    130 / 143 after SIGINT / SIGTERM)."""
    from grid.interrupts import GridInterrupted
    from grid.mlflow_content import DataRecord
    from grid.tracking import Tracker
    from occkd_core.data import store_summary

    started = time.monotonic()
    data = {}  # each task's store as MLflow datasets (name and split sizes from the file's schema)
    for task, store in prepared.items():
        name, splits = store_summary(store.path)
        data[task] = DataRecord(name=name, fingerprint=store.fingerprint, path=str(store.path), splits=splits)
    try:
        tracker = Tracker(spec.tracking_uri, spec.experiment, run_name=f"grid {time.strftime('%Y-%m-%d %H:%M:%S')}",
                          params={"tasks": ",".join(spec.tasks), "archs": ",".join(spec.archs),
                                  "preset": spec.preset.name, "seeds": spec.seeds,
                                  "data_root": str(spec.data_root or "synthetic"), "storage": str(spec.storage),
                                  "from_scratch": spec.from_scratch,
                                  "weights": {n.key: dict(n.init) for n in graph.nodes.values() if n.init}},
                          storage=str(spec.storage), grid_id=graph.identity, data=data)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if tracker.closed_stale:
        print(f"closed {tracker.closed_stale} MLflow run(s) left RUNNING by an interrupted invocation as FAILED")
    results: dict[str, NodeResult] = {}
    try:
        try:
            results.update(resume(graph, spec.storage, tracker))
        except ResultFormatError as err:  # a sealed result this code cannot read: rerunning would hide it
            print(f"error: {err}", file=sys.stderr)
            tracker.finish("FAILED")
            tracker.drain(print)
            return 2
        to_run = [k for k in graph.nodes if k not in results]
        tracker.record_invocation(complete=len(results), to_run=len(to_run))
        progress = Progress(graph, skipped=set(results))
        if interrupts is not None:  # a driver that cannot stop in time still leaves no run RUNNING
            interrupts.on_overdue = lambda: tracker.kill_open_runs(
                f"interrupted by {signal.Signals(interrupts.signum).name}; the driver did not stop in time")
        continued = f", continuing its parent run (invocation {tracker.invocation})" if tracker.invocation > 1 else ""
        print(f"{len(graph.nodes)} nodes: {len(results)} already complete, {len(to_run)} to run "
              f"(storage {spec.storage}, MLflow {spec.tracking_uri}{continued})")
        try:
            outcome = (run_on_ray(spec, graph, to_run, results, prepared, tracker, progress, interrupts) if to_run
                       else RayOutcome(graph=graph))
        except ValueError as err:  # a request that no node of the cluster can ever hold
            print(f"error: {err}", file=sys.stderr)
            tracker.finish("FAILED")
            tracker.drain(print)
            return 2
        if outcome.interrupted is not None:
            return write_interrupted(spec, outcome, results, tracker, to_run)
        return write_outputs(spec, outcome, results, tracker, progress, started)
    except GridInterrupted as stop:  # outside the experiment: before it, or while the records drain after it
        return leave_interrupted(spec, stop.signum, tracker, graph, results)


def resume(graph: StageGraph, storage: Path, tracker: Any) -> dict[str, NodeResult]:
    """The sealed results already on storage (checksums verified); any the MLflow store lacks (the driver
    was killed after a node sealed) are recorded now."""
    results: dict[str, NodeResult] = {}
    recorded = tracker.finished_hashes()
    for key, node in graph.nodes.items():
        result = read_result(node_dir(storage, node.hash))
        if result is not None:
            results[key] = result
            if node.hash not in recorded:
                tracker.finish_node(node, result, node_dir(storage, node.hash), ARTIFACTS[node.kind])
    return results


def run_on_ray(spec: GridSpec, graph: StageGraph, to_run: list[str], results: dict[str, NodeResult],
               prepared: Mapping[str, PreparedData], tracker: Any, progress: Progress,
               interrupts: Any = None) -> RayOutcome:
    """One Tune experiment over the nodes still to run; ``results`` gains each node as it seals."""
    import ray
    from ray import tune

    from grid.callbacks import GridCallback
    from grid.bundles import trial_resources
    from grid.capacity import ClusterCapacity, max_concurrency
    from grid.searcher import DependencySearcher, RunSettings
    from grid.trials import run_node_trial
    from grid.ddp_workers import WorkersPolicy

    init_ray(spec.ray_address, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             configure_logging=True)
    try:  # the preset's requests fitted once to what the cluster has or its autoscaler can add
        plan = plan_cluster(spec, graph, connect=True)
    except ValueError:
        ray.shutdown()
        raise
    graph = plan.graph
    # Tune's cap on trials; which node starts when is the capacity's call, as nodes join and leave.
    concurrency = max_concurrency([graph.nodes[k].resources for k in to_run], plan.shape.potential)
    machine_gpus = max((n.get("GPU", 0.0) for n in plan.shape.nodes), default=0.0)
    settings = RunSettings(storage=str(spec.storage), data_paths={t: str(p.path) for t, p in prepared.items()},
                           ray_train=plan.ray_train, fault_injection=fault_injection(),
                           train_max_failures=spec.max_failures, machine_gpus=machine_gpus, code=code_fingerprint(),
                           plugins=spec.preset.plugins)
    outcome = RayOutcome(graph=graph, started_at=time.time())
    workers_policy = (WorkersPolicy(machine_gpus=int(machine_gpus)) if spec.ddp_workers == "auto" and machine_gpus >= 1
                      else None)
    searcher = DependencySearcher(graph, to_run, set(results), settings, capacity=ClusterCapacity(plan.node_types),
                                  workers_policy=workers_policy)
    callback = GridCallback(graph, tracker, progress, spec.storage, results, outcome.failed, interrupts,
                            workers_note=searcher.workers_note)
    tuner = tune.Tuner(
        tune.with_resources(run_node_trial, resources=trial_resources),
        # reuse_actors: a trial process (Ray worker, torch and the data libraries imported) runs the
        # next node with the same resource request instead of a new process starting from scratch.
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(to_run),
                                    max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(name=f"grid-{int(time.time())}", storage_path=str(StorageLayout(spec.storage).ray_results),
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                  callbacks=[callback], verbose=0, stop=interrupts),
    )
    print("\n".join([plan.lines[0] + f"; up to {concurrency} nodes at once as the cluster has room", *plan.lines[1:]]))
    logging.getLogger("ray").setLevel(logging.CRITICAL)  # failures are summarised below, once
    if interrupts is not None:
        interrupts.install()  # again: ray.init put its own SIGTERM handler in place
        interrupts.in_experiment = True
    try:
        tuner.fit()
    finally:
        if interrupts is not None:
            interrupts.in_experiment = False
    outcome.interrupted = interrupts.signum if interrupts is not None else None
    outcome.blocked.update(searcher.blocked)
    outcome.ready_at.update(searcher.ready_at)
    outcome.completed_at.update(searcher.completed_at)
    for key, reason in searcher.failed.items():
        outcome.failed.setdefault(key, reason)
    ray.shutdown()
    return outcome
