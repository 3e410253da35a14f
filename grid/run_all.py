"""Run the whole occkd experiment grid: python grid/run_all.py --tasks fer,gender,age

Expands tasks × architectures × strategies × the preset's hyperparameter grid into a stage graph
(teacher → students → standard/triplet KD → fusion → significance), runs it on Ray (a node starts as
soon as its parents are done), records every node in MLflow and writes a paper-style report. Rerunning
the same command skips finished nodes and resumes interrupted ones from their last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NoReturn, Sequence

if __package__ in (None, ""):  # run as a script: make `grid` and `occkd_core` importable from a clone
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grid.progress import quiet_ray_environment  # noqa: E402

quiet_ray_environment()  # before Ray is imported

from grid import storage_lock  # noqa: E402
from grid.artifacts import ARTIFACTS, node_dir, read_result  # noqa: E402
from occkd_core.files import atomic_write_bytes  # noqa: E402
from grid.data import PreparedData, prepare_data  # noqa: E402
from grid.graph import StageGraph, default_resources, describe_graph, expand_graph  # noqa: E402
from grid.progress import Progress  # noqa: E402
from grid.code import code_fingerprint  # noqa: E402
from grid.ray_token import init_ray  # noqa: E402
from grid.figures import write_figures  # noqa: E402
from grid.report import collect_rows, write_report  # noqa: E402
from grid.timeline import node_timeline, overheads, summary_line, write_timeline  # noqa: E402
from occkd_core.presets import Preset, builtin_presets, load_preset, name_problem  # noqa: E402
from occkd_core.pretrained import FROM_SCRATCH, PRETRAINED, WeightsFile, get_pretrained  # noqa: E402
from occkd_core.models import ARCHITECTURES, get_architecture  # noqa: E402
from occkd_core.tasks import TASKS, get_task  # noqa: E402

@dataclass(frozen=True)
class GridSpec:
    """What one invocation runs, resolved and checked once from the command line."""

    tasks: tuple[str, ...]
    archs: tuple[str, ...]
    preset: Preset
    data_root: Path | None
    storage: Path  # absolute
    tracking_uri: str | None  # None: sqlite:///mlflow.db in the working directory (resolved in main)
    experiment: str
    ray_address: str | None
    cluster_config: Path | None  # the autoscaler's node types (cluster-launcher YAML), when known
    seeds: int
    weights: Mapping[str, str]  # pre-trained weights name -> the file as given
    from_scratch: bool
    max_failures: int
    ray_train: str
    dry_run: bool
    widths: str = "auto"  # "auto": the searcher chooses GPU nodes' widths (grid.widths); "preset": as given
    wait: bool = False  # another grid holds the storage: wait for it rather than stop


class _Parser(argparse.ArgumentParser):
    """argparse, less the usage block it prints above every error: with a dozen options it buried the one
    line that says what was wrong."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help for every option)\n")


def parse_args(argv: Sequence[str] | None = None) -> GridSpec:
    parser = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tasks", required=True,
                        help=f"comma-separated tasks: {','.join(TASKS)}")
    parser.add_argument("--archs", default=",".join(ARCHITECTURES),
                        help="comma-separated architectures")
    parser.add_argument("--preset", default="smoke",
                        help=f"built-in preset ({', '.join(builtin_presets())}) or a preset YAML path. "
                             "smoke runs on the built-in synthetic faces in minutes on a laptop; paper holds every "
                             "hyperparameter of the papers (docs/method.md §10)")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="directory holding the data sets as their authors distribute them (ferplus/, "
                             "optionally affectnet/, utkface/), converted once into cached stores under "
                             "--storage; default: the built-in synthetic faces")
    parser.add_argument("--storage", type=Path, default=Path("occkd_runs"),
                        help="where nodes write checkpoints, predictions and reports; on a multi-node cluster "
                             "a shared filesystem path that every node mounts at the same place")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: sqlite:///mlflow.db in the working directory, "
                             "so `mlflow ui` opens it; on a cluster the MLflow server, e.g. http://127.0.0.1:5000)")
    parser.add_argument("--experiment", default=None,
                        help="MLflow experiment name, also the report's folder under --storage (reports/NAME), so one "
                             "folder name (default: occkd-<preset>)")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join ('auto' on a cluster head); default: start a local Ray")
    parser.add_argument("--cluster-config", type=Path, default=None,
                        help="the Ray cluster-launcher YAML whose node types the autoscaler may add (default with "
                             f"--ray-address: {BOOTSTRAP_CONFIG}, which `ray up` leaves on the head, if present); "
                             "GPU requests are kept when a node type has GPUs, though none runs yet")
    parser.add_argument("--seeds", type=int, default=1, help="repeat every node with seeds 0..N-1")
    parser.add_argument("--weights", action="append", default=[], metavar="NAME=PATH",
                        help="the local file of pre-trained weights the preset's teachers start from, by name: "
                             f"{', '.join(sorted(PRETRAINED))} (e.g. vggface=vgg-face.mat); repeatable. The file's "
                             "sha256 is part of each teacher's identity. Nothing is downloaded")
    parser.add_argument("--from-scratch", action="store_true",
                        help="train every teacher from random initialisation, also those the preset starts from "
                             "pre-trained weights (the report says so)")
    parser.add_argument("--max-failures", type=int, default=2,
                        help="times Tune retries a failed node (it resumes from its last checkpoint)")
    parser.add_argument("--ray-train", choices=("auto", "always", "multi"), default="auto",
                        help="where training nodes run their loop. auto: on a cluster that has GPUs or an "
                             "autoscaler node type with GPUs, every training node as Ray Train workers "
                             "(TorchTrainer: DDP, Train's checkpoints, worker-group restarts after a lost "
                             "worker); on a CPU-only one inside its Tune trial, except nodes with several "
                             "workers (on a CPU machine a worker group costs more to start than a small node "
                             "trains). always / multi: either way, whatever the cluster")
    parser.add_argument("--widths", choices=("auto", "preset"), default="auto",
                        help="how many GPUs (DDP workers) a training node gets on a GPU cluster. auto: chosen as "
                             "the node starts, more for the chains of nodes that bound the grid's makespan while "
                             "GPUs are free, in powers of two up to one machine's GPUs, within the preset's "
                             "resources.<arch>.max_workers / workers and the batch (grid/widths.py). preset: the "
                             "preset's workers (default 1). The training is the same at any width")
    parser.add_argument("--wait", action="store_true",
                        help="when another grid is running on --storage, wait for it to end instead of stopping "
                             "(one grid per storage at a time)")
    parser.add_argument("--dry-run", action="store_true", help="print the stage graph with resources and exit")
    args = parser.parse_args(argv)
    try:
        tasks = tuple(get_task(t.strip()).name for t in args.tasks.split(",") if t.strip())
        archs = tuple(get_architecture(a.strip()).name for a in args.archs.split(",") if a.strip())
        preset = load_preset(args.preset)
        weights = dict(_parse_weight(w) for w in args.weights)
    except ValueError as err:
        parser.error(str(err))
    if not tasks or not archs:
        parser.error("--tasks and --archs need at least one name each")
    for option, names in (("--tasks", tasks), ("--archs", archs)):
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            parser.error(f"{option} names {', '.join(repeated)} more than once")
    problem = storage_problem(args.storage)
    if problem:
        parser.error(f"--storage {str(args.storage)!r}: {problem}")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.max_failures < 0:  # Tune reads -1 as "retry for ever": a node that always fails would never end
        parser.error(f"--max-failures must be >= 0 (retries of a failed node), got {args.max_failures}")
    problem = name_problem(args.experiment) if args.experiment is not None else None
    if problem:
        parser.error(f"--experiment {problem}")
    cluster_config = args.cluster_config
    if cluster_config is None and args.ray_address and BOOTSTRAP_CONFIG.expanduser().is_file():
        cluster_config = BOOTSTRAP_CONFIG.expanduser()
    if cluster_config is not None and not cluster_config.is_file():
        parser.error(f"--cluster-config {str(cluster_config)!r} is not a file")
    return GridSpec(tasks=tasks, archs=archs, preset=preset, data_root=args.data_root,
                    storage=args.storage.resolve(), tracking_uri=args.tracking_uri,
                    experiment=args.experiment or f"occkd-{preset.name}", ray_address=args.ray_address,
                    cluster_config=cluster_config,
                    seeds=args.seeds, weights=weights, from_scratch=args.from_scratch,
                    max_failures=args.max_failures, ray_train=args.ray_train, widths=args.widths,
                    dry_run=args.dry_run, wait=args.wait)


def storage_problem(storage: Path) -> str | None:
    """Why the grid could not write under ``storage``, or None: checked before anything is written. The
    nearest existing folder on the path must be a writable directory (the rest is created later)."""
    path = storage.expanduser().resolve()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing == path and not path.is_dir():
        return "exists and is not a folder"
    if not existing.is_dir():
        return f"{existing} is a file, so no folder can be made under it"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable by this user"
    return None


def _fault_injection() -> dict[str, int] | None:
    """Tests inject worker crashes through OCCKD_FAULT_INJECTION='{"node": KEY, "times": N}' (or a JSON list
    of them): the node's first N attempts raise, as a crashing worker would."""
    text = os.environ.get("OCCKD_FAULT_INJECTION")
    if not text:
        return None
    faults = json.loads(text)
    return {f["node"]: int(f.get("times", 1)) for f in ([faults] if isinstance(faults, dict) else faults)}


#: Where `ray up` leaves the cluster config on the head node.
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def _parse_weight(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise ValueError(f"--weights {text!r}: expected NAME=PATH, e.g. vggface=/data/vgg-face.mat")
    get_pretrained(name)
    return name, path


def resolve_weights(preset: Preset, tasks: list[str], archs: list[str], given: Mapping[str, str],
                    from_scratch: bool) -> dict[str, WeightsFile]:
    """The weights files the selected teachers start from, checksummed and test-loaded into their
    architecture now, so a missing or wrong file fails before any data is prepared (ValueError /
    FileNotFoundError with one actionable line, or the layers that do not fit)."""
    from occkd_core.models import ModelSpec, build_model, load_pretrained

    needed = preset.required_weights(tasks, archs)
    if from_scratch and given:
        raise ValueError("--from-scratch trains every teacher from random initialisation; drop --weights "
                         f"{','.join(given)} or --from-scratch")
    unused = sorted(set(given) - set(needed))
    if unused:
        uses = ", ".join(f"{n} ({', '.join(t)})" for n, t in needed.items()) or "none: every teacher starts from scratch"
        raise ValueError(f"--weights {','.join(unused)}: preset {preset.name!r} starts none of the selected teachers "
                         f"from {' or '.join(unused)} (it uses {uses})")
    missing = {name: teachers for name, teachers in needed.items() if name not in given}
    if missing and not from_scratch:
        listed = "; ".join(f"{name} (e.g. {get_pretrained(name).files[0]}) for {', '.join(teachers)}"
                           for name, teachers in missing.items())
        example = " ".join(f"--weights {name}=PATH" for name in missing)
        raise ValueError(f"preset {preset.name!r} starts teachers from pre-trained weights that were not given: "
                         f"{listed}; pass {example}, or --from-scratch to train them from random initialisation")
    found = {}
    for name, path in given.items():
        weights = WeightsFile.locate(name, path)
        arch = get_pretrained(name).arch
        settings = preset.arch(arch)
        model = build_model(ModelSpec(arch=arch, num_outputs=2, width_mult=settings.width_mult,
                                      dropout=settings.dropout))
        load_pretrained(model, weights.path)  # a wrong file fails now, not hours into the grid
        found[name] = weights
    return found


def stage_weights(found: Mapping[str, WeightsFile], storage: Path) -> dict[str, WeightsFile]:
    """Copy each weights file onto the grid's storage, under its sha256, and start the teachers from that
    copy: ``--weights`` paths are read where the driver runs, but teachers train on worker nodes, which
    all mount the storage. A copy is made once (an interrupted one never takes the final name)."""
    staged = {}
    for name, weights in found.items():
        target = storage / "pretrained" / weights.sha256 / Path(weights.path).name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f"{target.name}.partial")
            shutil.copyfile(weights.path, partial)
            os.replace(partial, target)
        staged[name] = dataclasses.replace(weights, path=str(target))
    return staged


def describe_init(graph: StageGraph, preset: Preset, from_scratch: bool) -> str:
    """The report's sentence on where the teachers started."""
    by_weights: dict[str, list[str]] = {}
    for node in graph.nodes.values():
        if node.strategy == "teacher":
            init = node.init or {"weights": FROM_SCRATCH}
            mean = (", input mean " + "/".join(f"{m:.2f}" for m in init["input_mean"])
                    if "input_mean" in init else "")
            label = (f"{init['weights']} ({Path(init['file']).name}, sha256 {init['sha256'][:12]}{mean})"
                     if init["weights"] != FROM_SCRATCH else "from scratch")
            by_weights.setdefault(label, []).append(f"{node.task}/{node.arch}")
    text = "Teachers: " + "; ".join(f"{label}: {', '.join(sorted(set(t)))}" for label, t in by_weights.items()) + "."
    overridden = preset.required_weights(sorted({n.task for n in graph.nodes.values()}),
                                         sorted({n.arch for n in graph.nodes.values() if n.arch}))
    if from_scratch and overridden:
        text += (f" **Trained from scratch by --from-scratch**, although preset `{preset.name}` starts "
                 + "; ".join(f"{', '.join(t)} from {n}" for n, t in overridden.items())
                 + " (the papers' numbers assume those weights).")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    spec = parse_args(argv)
    if spec.dry_run:
        return _main(spec, None)
    from grid.interrupts import GridInterrupted, Interrupts, exit_status

    try:
        interrupts = Interrupts()
    except ValueError as err:  # OCCKD_STOP_GRACE_S
        print(f"error: {err}", file=sys.stderr)
        return 2
    interrupts.install()
    try:
        return _main(spec, interrupts)
    except GridInterrupted as stop:  # before any node ran: nothing to close but the parent run, if any
        print(f"\n{stop}: stopped before any node ran; rerun the same command to start again", file=sys.stderr)
        return exit_status(stop.signum)
    finally:
        interrupts.restore()


def _main(spec: GridSpec, interrupts: Any) -> int:
    lock = None
    if not spec.dry_run:
        from grid.tracking import check_tracking_uri, default_tracking_uri

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


@dataclass(frozen=True)
class ClusterPlan:
    """The graph with its requests fitted to the cluster, and how training nodes will run there."""

    graph: StageGraph
    shape: Any  # grid.scheduler.ClusterShape
    node_types: Mapping[str, Any] | None
    ray_train: str  # resolved: "always" or "multi"
    lines: tuple[str, ...]  # what the grid says about the cluster in its first lines


def cluster_now(spec: GridSpec, *, connect: bool) -> tuple[dict[str, float], Any, Mapping[str, Any] | None]:
    """The cluster's resources now, its shape (grid.scheduler.ClusterShape) and the autoscaler's node types from
    --cluster-config: the Ray cluster the driver is connected to, or this machine as a local Ray would see it."""
    from grid.scheduler import cluster_shape, live_nodes, read_node_types

    node_types = read_node_types(spec.cluster_config) if spec.cluster_config else None
    if connect:
        import ray

        now, live = ray.cluster_resources(), live_nodes()
    else:
        import torch

        now = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
        live = [now]
    return now, cluster_shape(now, live, node_types), node_types


def fit_preset_resources(spec: GridSpec, shape: Any) -> dict[str, Any]:
    """Each ``resources:`` entry of the preset (an architecture of this run, fusion, significance) fitted to
    ``shape``; ValueError naming the entry and its values for a request no node or node type can ever hold."""
    from grid.scheduler import fit_resources

    fits = {}
    for owner, request in default_resources(spec.preset, spec.archs).items():
        try:
            fits[owner] = fit_resources(request, shape)
        except ValueError as err:
            raise ValueError(f"preset {spec.preset.name!r}: resources.{owner} (cpus: {request.cpus:g}, gpus: "
                             f"{request.gpus:g}) cannot run here: {err}") from None
    return fits


def plan_cluster(spec: GridSpec, graph: StageGraph, *, connect: bool) -> ClusterPlan:
    """Fit every node's request to the cluster (``connect``: the Ray cluster the driver is connected to;
    else this machine as a local Ray would see it) and the autoscaler's node types from --cluster-config.
    ValueError for a request no node or node type can ever hold."""
    from grid.scheduler import resolve_ray_train

    now, shape, node_types = cluster_now(spec, connect=connect)
    wanted = default_resources(spec.preset, spec.archs)
    fits = fit_preset_resources(spec, shape)
    fitted = graph.with_resources({k: fits[n.arch if n.kind == "train" else n.kind] for k, n in graph.nodes.items()})
    ray_train = resolve_ray_train(spec.ray_train, shape)
    can_add = (f" (the autoscaler may grow it to {shape.potential['CPU']:g} CPUs, {shape.potential['GPU']:g} GPUs)"
               if node_types else "")
    where = {"always": "as Ray Train workers", "multi": "inside their trials (multi-worker nodes: Ray Train)"}
    lines = [f"{'running on Ray' if connect else 'planned for this machine'}: {now.get('CPU', 0):g} CPUs, "
             f"{now.get('GPU', 0):g} GPUs{can_add}; training nodes run {where[ray_train]}"]
    if any(r.gpus for r in wanted.values()) and not shape.can_have_gpus:
        lines.append("no GPU in the cluster and no autoscaler node type with GPUs"
                     + (f" in {spec.cluster_config}" if spec.cluster_config else " known (see --cluster-config)")
                     + ": GPU requests dropped, training on CPUs")
    # CPU requests are capped rather than refused: a preset written for a cluster's nodes (paper, mid: 4-8 CPUs)
    # still runs on a smaller machine; this says so, naming the preset's value, instead of ignoring it.
    for owner, request in wanted.items():
        if fits[owner].cpus < request.cpus and owner in spec.preset.resources:
            lines.append(f"resources.{owner}.cpus: {request.cpus:g} is more than any node has: its nodes ask for "
                         f"{fits[owner].cpus:g} CPUs (the largest node's)")
    machine_gpus = max((n.get("GPU", 0.0) for n in shape.nodes), default=0.0)
    if spec.widths == "auto" and machine_gpus >= 2 and any(n.resources.gpus for n in fitted.nodes.values()):
        lines.append(f"widths: each GPU training node gets 1 to {machine_gpus:g} GPUs (DDP workers) as it starts, "
                     "more for the chains that bound the makespan (--widths preset: the preset's workers)")
    return ClusterPlan(graph=fitted, shape=shape, node_types=node_types, ray_train=ray_train, lines=tuple(lines))


@dataclass
class RayOutcome:
    """What running the remaining nodes on Ray left behind, for the report and the exit status."""

    graph: StageGraph  # with the resources the cluster could give
    failed: dict[str, str] = field(default_factory=dict)  # node key -> reason
    blocked: dict[str, str] = field(default_factory=dict)  # node key -> the failed ancestor
    ready_at: dict[str, float] = field(default_factory=dict)  # node key -> handed to Tune (wall clock)
    completed_at: dict[str, float] = field(default_factory=dict)
    started_at: float = 0.0
    interrupted: int | None = None  # the signal that stopped the experiment, if one did


def run_graph(spec: GridSpec, graph: StageGraph, prepared: Mapping[str, PreparedData], interrupts: Any = None) -> int:
    """Resume what is done, run the rest on Ray, write the report; the exit status (0, 1: nodes failed, 2;
    130 / 143 after SIGINT / SIGTERM)."""
    from grid.interrupts import GridInterrupted
    from grid.tracking import DataRecord, Tracker
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
    results: dict[str, dict[str, Any]] = {}
    try:
        results.update(resume(graph, spec.storage, tracker))
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


def leave_interrupted(spec: GridSpec, signum: int, tracker: Any, graph: StageGraph,
                      results: Mapping[str, Any]) -> int:
    """A signal while no node trains (before the experiment, or after it while MLflow records drain): the
    records still queued are left to the next run, the runs this invocation left open end KILLED now, and
    the user learns what is done. Exit status: the shell's for the signal."""
    from grid.interrupts import exit_status

    name = signal.Signals(signum).name
    left = tracker.recorder.pending()[0]
    closed = tracker.kill_open_runs(f"interrupted by {name}")
    sealed = sum(key in results for key in graph.nodes)
    print(f"\ninterrupted by {name}: {sealed} of the grid's {len(graph.nodes)} nodes are sealed on storage"
          + (f"; {left} MLflow record(s) not yet written are left to the next run" if left else "")
          + (f" ({closed} run(s) closed as KILLED)" if closed else "")
          + ". Rerun the same command to go on (sealed nodes are kept and recorded, nothing is trained twice).",
          file=sys.stderr)
    return exit_status(signum)


def write_interrupted(spec: GridSpec, outcome: "RayOutcome", results: Mapping[str, Any], tracker: Any,
                      to_run: list[str]) -> int:
    """After SIGINT / SIGTERM: every node run this invocation left open and the parent end as KILLED, the
    report stays as the last complete invocation wrote it, and the user learns what stopped and how to go
    on. The exit status is the shell's for the signal."""
    import signal

    from grid.interrupts import exit_status

    name = signal.Signals(outcome.interrupted).name
    stopped = sorted(k for k in tracker.started if k not in results and k not in outcome.failed)
    for key in stopped:
        tracker.kill_node(outcome.graph.nodes[key], f"interrupted by {name}")
    tracker.finish("KILLED")
    tracker.drain(lambda text: print(text + " (a second Ctrl-C leaves them to the next run)", file=sys.stderr))
    sealed = [k for k in to_run if k in results]
    print(f"\ninterrupted by {name}: {len(sealed)} of the {len(to_run)} nodes to run were sealed"
          + (f"; stopped: {', '.join(stopped)}" if stopped else "")
          + ". No report written. Rerun the same command to resume (sealed nodes are kept, training nodes "
          "resume from their last epoch).", file=sys.stderr)
    return exit_status(outcome.interrupted)


def resume(graph: StageGraph, storage: Path, tracker: Any) -> dict[str, dict[str, Any]]:
    """The sealed results already on storage (checksums verified); any the MLflow store lacks (the driver
    was killed after a node sealed) are recorded now."""
    results: dict[str, dict[str, Any]] = {}
    recorded = tracker.finished_hashes()
    for key, node in graph.nodes.items():
        result = read_result(node_dir(storage, node.hash))
        if result is not None:
            results[key] = result
            if node.hash not in recorded:
                tracker.finish_node(node, result, node_dir(storage, node.hash), ARTIFACTS[node.kind])
    return results


def run_on_ray(spec: GridSpec, graph: StageGraph, to_run: list[str], results: dict[str, dict[str, Any]],
               prepared: Mapping[str, PreparedData], tracker: Any, progress: Progress,
               interrupts: Any = None) -> RayOutcome:
    """One Tune experiment over the nodes still to run; ``results`` gains each node as it seals."""
    import ray
    from ray import tune

    from grid.callbacks import GridCallback
    from grid.scheduler import (
        ClusterCapacity, DependencySearcher, RunSettings, max_concurrency, run_node_trial, trial_resources,
    )
    from grid.widths import WidthPolicy

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
                           ray_train=plan.ray_train, fault_injection=_fault_injection(),
                           train_max_failures=spec.max_failures, machine_gpus=machine_gpus, code=code_fingerprint())
    outcome = RayOutcome(graph=graph, started_at=time.time())
    widths = WidthPolicy(machine_gpus=int(machine_gpus)) if spec.widths == "auto" and machine_gpus >= 1 else None
    searcher = DependencySearcher(graph, to_run, set(results), settings, capacity=ClusterCapacity(plan.node_types),
                                  widths=widths)
    callback = GridCallback(graph, tracker, progress, spec.storage, results, outcome.failed, interrupts)
    tuner = tune.Tuner(
        tune.with_resources(run_node_trial, resources=trial_resources),
        # reuse_actors: a trial process (Ray worker, torch and the data libraries imported) runs the
        # next node with the same resource request instead of a new process starting from scratch.
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(to_run),
                                    max_concurrent_trials=concurrency, reuse_actors=True),
        run_config=tune.RunConfig(name=f"grid-{int(time.time())}", storage_path=str(spec.storage / "ray_results"),
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


def write_outputs(spec: GridSpec, outcome: RayOutcome, results: Mapping[str, dict[str, Any]], tracker: Any,
                  progress: Progress, started: float) -> int:
    """The report, the timeline of this invocation, the parent run's status and the exit summary."""
    graph = outcome.graph
    report_dir = spec.storage / "reports" / spec.experiment
    setting = (f"Preset `{spec.preset.name}`: {spec.preset.description} Data: "
               f"{spec.data_root or 'built-in synthetic faces'}. Seeds: {spec.seeds}. "
               + describe_init(graph, spec.preset, spec.from_scratch))
    rows = collect_rows(graph, results)
    figures = write_figures(rows, graph, results, report_dir)
    paths = write_report(rows, report_dir, title="occkd report", setting=setting, figures=figures)
    if outcome.ready_at:  # where this invocation's wall time went, node by node
        timeline = node_timeline(graph, results, outcome.ready_at, outcome.completed_at, origin=outcome.started_at)
        paths.append(write_timeline(timeline, report_dir / "timeline.csv"))
        stats = overheads(graph, timeline)
        paths.append(atomic_write_bytes(report_dir / "overheads.json", json.dumps(stats, indent=1).encode()))
        print(summary_line(stats))
    failed, blocked = outcome.failed, outcome.blocked
    upload_errors = tracker.drain(print)
    tracker.finish("FAILED" if failed or blocked or upload_errors or tracker.unrecorded() else "FINISHED",
                   artifacts=paths, figures=[path for _, path in figures],
                   note=parent_note(spec, graph, tracker, paths[0]))
    upload_errors = tracker.drain()
    unrecorded = tracker.unrecorded()
    print(progress.summary_line())
    print(f"report: {paths[0]}  (CSV: {paths[1]}; {len(figures)} figures); {time.monotonic() - started:.0f} s")
    print(mlflow_lines(spec.tracking_uri, tracker.link))
    for key, error in upload_errors.items():
        print(f"  MLflow upload of {key} failed ({error}); its outputs are sealed on storage and the next run "
              f"records them again", file=sys.stderr)
    if unrecorded:
        from grid.records import describe_unrecorded

        print(describe_unrecorded(unrecorded, spec.tracking_uri), file=sys.stderr)
    if (upload_errors or unrecorded) and not (failed or blocked):
        return 1  # every node sealed, but MLflow lacks some of them until the next run
    if failed or blocked:
        print(f"\n{len(failed)} node(s) failed, {len(blocked)} blocked:", file=sys.stderr)
        for key, reason in failed.items():
            print(f"  FAILED  {key}: {reason}", file=sys.stderr)
        for key, parent in blocked.items():
            print(f"  BLOCKED {key}: parent {parent} failed", file=sys.stderr)
        return 1
    return 0


def mlflow_lines(tracking_uri: str, link: str) -> str:
    """How to open the runs table: the link (MLflow's model-training view), and for a local store the
    command that serves it."""
    from grid.tracking import ui_command

    command = ui_command(tracking_uri)
    return (f"MLflow runs table: {link}" + (f"\n  (serve it first: {command})" if command else ""))


def parent_note(spec: GridSpec, graph: StageGraph, tracker: Any, report: Path) -> str:
    """The parent run's description in the MLflow UI: what the grid is, where its runs and report are."""
    return (f"**occkd grid** `{graph.identity}`: {len(graph.nodes)} nodes, tasks {', '.join(spec.tasks)}, "
            f"architectures {', '.join(spec.archs)}, preset `{spec.preset.name}`, seeds {spec.seeds}.\n\n"
            f"[Runs table]({tracker.link}) · report `{report}` (also under this run's artifacts, with its figures "
            f"in `figures/`) · invocations so far: {tracker.invocation} (tags `occkd.invocation.N`).")


if __name__ == "__main__":
    sys.exit(main())
