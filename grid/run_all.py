"""Run the whole occkd experiment grid: python grid/run_all.py --tasks fer,gender,age

Expands tasks × architectures × strategies × the preset's hyperparameter grid into a stage graph
(teacher → students → standard/triplet KD → fusion → significance), runs it on Ray (a node starts as
soon as its parents are done), records every node in MLflow and writes a paper-style report. Rerunning
the same command skips finished nodes and resumes interrupted ones from their last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

if __package__ in (None, ""):  # run as a script: make `grid` and `occkd_core` importable from a clone
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grid.progress import quiet_ray_environment  # noqa: E402

quiet_ray_environment()  # before Ray is imported

from grid.artifacts import ARTIFACTS, node_dir, read_result  # noqa: E402
from grid.data import prepare_data  # noqa: E402
from grid.graph import Node, StageGraph, default_resources, describe_graph, expand_graph  # noqa: E402
from grid.progress import Progress  # noqa: E402
from grid.report import collect_rows, write_report  # noqa: E402
from grid.timeline import node_timeline, overheads, summary_line, write_timeline  # noqa: E402
from occkd_core.presets import Preset, builtin_presets, load_preset  # noqa: E402
from occkd_core.pretrained import FROM_SCRATCH, PRETRAINED, WeightsFile, get_pretrained  # noqa: E402
from occkd_core.models import ARCHITECTURES, get_architecture  # noqa: E402
from occkd_core.tasks import TASKS, get_task  # noqa: E402

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tasks", required=True,
                        help=f"comma-separated tasks: {','.join(TASKS)}")
    parser.add_argument("--archs", default=",".join(ARCHITECTURES),
                        help="comma-separated architectures")
    parser.add_argument("--preset", default="smoke",
                        help=f"built-in preset ({', '.join(builtin_presets())}) or a preset YAML path. "
                             "smoke runs on the built-in synthetic faces in minutes on a laptop; paper is spec §10")
    parser.add_argument("--data-root", type=Path, default=None,
                        help="directory of prepared data (fer.arrow, utkface.arrow); default: synthetic faces")
    parser.add_argument("--storage", type=Path, default=Path("occkd_runs"),
                        help="where nodes write checkpoints, predictions and reports; on a multi-node cluster "
                             "a shared filesystem path that every node mounts at the same place")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default: sqlite:///mlflow.db in the working directory, "
                             "so `mlflow ui` opens it; on a cluster the MLflow server, e.g. http://127.0.0.1:5000)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment name (default: occkd-<preset>)")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join ('auto' on a cluster head); default: start a local Ray")
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
    parser.add_argument("--ray-train", choices=("multi", "always"), default="multi",
                        help="run training in Ray Train worker groups for multi-worker nodes only, or always")
    parser.add_argument("--dry-run", action="store_true", help="print the stage graph with resources and exit")
    args = parser.parse_args(argv)
    try:
        args.tasks = [get_task(t.strip()).name for t in args.tasks.split(",") if t.strip()]
        args.archs = [get_architecture(a.strip()).name for a in args.archs.split(",") if a.strip()]
        args.preset_obj = load_preset(args.preset)
        args.weights = dict(_parse_weight(w) for w in args.weights)
    except ValueError as err:
        parser.error(str(err))
    if not args.tasks or not args.archs:
        parser.error("--tasks and --archs need at least one name each")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    return args


def _fault_injection() -> dict[str, Any] | None:
    """Tests inject worker crashes through OCCKD_FAULT_INJECTION='{"node": KEY, "times": N}': the node's
    first N attempts raise, as a crashing worker would."""
    text = os.environ.get("OCCKD_FAULT_INJECTION")
    return json.loads(text) if text else None


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


def describe_init(graph: StageGraph, preset: Preset, from_scratch: bool) -> str:
    """The report's sentence on where the teachers started."""
    by_weights: dict[str, list[str]] = {}
    for node in graph.nodes.values():
        if node.strategy == "teacher":
            init = node.init or {"weights": FROM_SCRATCH}
            label = (f"{init['weights']} ({Path(init['file']).name}, sha256 {init['sha256'][:12]})"
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
    args = parse_args(argv)
    preset, storage = args.preset_obj, args.storage.resolve()
    if not args.dry_run:
        from grid.tracking import check_tracking_uri, default_tracking_uri

        args.tracking_uri = args.tracking_uri or default_tracking_uri(Path.cwd())
        try:
            check_tracking_uri(args.tracking_uri)
        except RuntimeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    try:
        weights = resolve_weights(preset, args.tasks, args.archs, args.weights, args.from_scratch)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        prepared = prepare_data(preset, args.tasks, storage, args.data_root, write=not args.dry_run)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    graph = expand_graph(preset, args.tasks, args.archs, seeds=args.seeds,
                         train_sizes={t: p.num_train for t, p in prepared.items()},
                         data_fingerprints={t: p.fingerprint for t, p in prepared.items()},
                         weights=weights, from_scratch=args.from_scratch)
    if args.dry_run:
        print(describe_graph(graph))
        return 0
    return run_graph(args, graph, prepared, storage)


def run_graph(args: argparse.Namespace, graph: StageGraph, prepared: dict, storage: Path) -> int:
    import ray
    from ray import tune

    from grid.callbacks import GridCallback
    from grid.scheduler import (
        DependencySearcher, RunSettings, fit_resources, max_concurrency, run_node_trial, trial_resources,
    )
    from grid.tracking import Tracker

    preset = args.preset_obj
    started = time.monotonic()
    tracking_uri = args.tracking_uri  # resolved and checked in main()
    try:
        tracker = Tracker(tracking_uri, args.experiment or f"occkd-{preset.name}",
                          run_name=f"grid {time.strftime('%Y-%m-%d %H:%M:%S')}",
                          params={"tasks": ",".join(args.tasks), "archs": ",".join(args.archs), "preset": preset.name,
                                  "seeds": args.seeds, "data_root": str(args.data_root or "synthetic"),
                                  "storage": str(storage), "from_scratch": args.from_scratch,
                                  "weights": {n.key: dict(n.init) for n in graph.nodes.values() if n.init}})
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if tracker.closed_stale:
        print(f"closed {tracker.closed_stale} MLflow run(s) left RUNNING by an interrupted invocation as FAILED")

    # -- what is already done ----------------------------------------------------------------------
    results: dict[str, dict[str, Any]] = {}
    recorded = tracker.finished_hashes()
    for key, node in graph.nodes.items():
        result = read_result(node_dir(storage, node.hash))
        if result is not None:
            results[key] = result
            if node.hash not in recorded:  # finished on disk but never recorded (driver killed at the end)
                tracker.finish_node(node, result, node_dir(storage, node.hash), ARTIFACTS[node.kind])
    to_run = [k for k in graph.nodes if k not in results]
    progress = Progress(graph, skipped=set(results))
    print(f"{len(graph.nodes)} nodes: {len(results)} already complete, {len(to_run)} to run "
          f"(storage {storage}, MLflow {tracking_uri})")

    failed: dict[str, str] = {}
    blocked: dict[str, str] = {}
    ready_at: dict[str, float] = {}
    completed_at: dict[str, float] = {}
    grid_started_at = time.time()
    if to_run:
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR", configure_logging=True)
        cluster = ray.cluster_resources()
        largest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=1.0)
        wanted = default_resources(preset, args.archs)
        resources = {k: fit_resources(wanted[n.arch] if n.kind == "train" else wanted[n.kind], cluster, largest)
                     for k, n in graph.nodes.items()}
        graph = StageGraph(nodes={k: Node(**{**n.__dict__, "resources": resources[k]}) for k, n in graph.nodes.items()})
        concurrency = max_concurrency([resources[k] for k in to_run], cluster)
        settings = RunSettings(storage=str(storage), data_paths={t: str(p.path) for t, p in prepared.items()},
                               ray_train=args.ray_train,
                               fault_injection=_fault_injection())
        searcher = DependencySearcher(graph, to_run, set(results), settings, resources)
        callback = GridCallback(graph, tracker, progress, storage, results, failed)
        tuner = tune.Tuner(
            tune.with_resources(run_node_trial, resources=trial_resources),
            # reuse_actors: a trial process (Ray worker, torch and the data libraries imported) runs the
            # next node with the same resource request instead of a new process starting from scratch.
            tune_config=tune.TuneConfig(search_alg=searcher, num_samples=len(to_run),
                                        max_concurrent_trials=concurrency, reuse_actors=True),
            run_config=tune.RunConfig(name=f"grid-{int(time.time())}", storage_path=str(storage / "ray_results"),
                                      failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                      callbacks=[callback], verbose=0),
        )
        print(f"running on Ray: {cluster.get('CPU', 0):g} CPUs, {cluster.get('GPU', 0):g} GPUs, "
              f"up to {concurrency} nodes at once")
        logging.getLogger("ray").setLevel(logging.CRITICAL)  # failures are summarised below, once
        tuner.fit()
        blocked = dict(searcher.blocked)
        ready_at, completed_at = searcher.ready_at, searcher.completed_at
        for key, reason in searcher.failed.items():
            failed.setdefault(key, reason)
        ray.shutdown()

    # -- report -------------------------------------------------------------------------------------------
    rows = collect_rows(graph, results)
    report_dir = storage / "reports" / (args.experiment or f"occkd-{preset.name}")
    setting = (f"Preset `{preset.name}`: {preset.description} Data: "
               f"{args.data_root or 'built-in synthetic faces'}. Seeds: {args.seeds}. "
               + describe_init(graph, preset, args.from_scratch))
    paths = write_report(rows, report_dir, title="occkd report", setting=setting)
    if ready_at:  # where this invocation's wall time went, node by node
        timeline = node_timeline(graph, results, ready_at, completed_at, origin=grid_started_at)
        paths.append(write_timeline(timeline, report_dir / "timeline.csv"))
        stats = overheads(graph, timeline)
        (report_dir / "overheads.json").write_text(json.dumps(stats, indent=1))
        paths.append(report_dir / "overheads.json")
        print(summary_line(stats))
    status = "FAILED" if failed or blocked else "FINISHED"
    tracker.finish(status, artifacts=paths)
    print(progress.summary_line())
    print(f"report: {paths[0]}  (CSV: {paths[1]}); {time.monotonic() - started:.0f} s")
    if failed or blocked:
        print(f"\n{len(failed)} node(s) failed, {len(blocked)} blocked:", file=sys.stderr)
        for key, reason in failed.items():
            print(f"  FAILED  {key}: {reason}", file=sys.stderr)
        for key, parent in blocked.items():
            print(f"  BLOCKED {key}: parent {parent} failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
