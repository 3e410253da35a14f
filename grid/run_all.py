"""Run the whole occkd experiment grid: python grid/run_all.py --tasks fer,gender,age

Expands tasks × architectures × stages × the preset's hyperparameter grid into a stage graph
(teacher → students → standard/triplet KD → fusion → significance), runs it on Ray (a node starts as
soon as its parents are done), records every node in MLflow and writes a paper-style report. Rerunning
the same command skips finished nodes and resumes interrupted ones from their last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn, Sequence

if __package__ in (None, ""):  # run as a script: make `grid` and `occkd_core` importable from a clone
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grid.progress import quiet_ray_environment  # noqa: E402

quiet_ray_environment()  # before Ray is imported

from grid.driver import run_grid  # noqa: E402
from grid.spec import GridSpec  # noqa: E402
from occkd_core.models import ARCHITECTURES, get_architecture  # noqa: E402
from occkd_core.presets import Preset, builtin_presets, load_preset, name_problem  # noqa: E402
from occkd_core.pretrained import PRETRAINED, get_pretrained  # noqa: E402
from occkd_core.tasks import TASKS, get_task  # noqa: E402


class _Parser(argparse.ArgumentParser):
    """argparse, less the usage block it prints above every error: with a dozen options it buried the one
    line that says what was wrong."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help for every option)\n")


def parse_args(argv: Sequence[str] | None = None) -> GridSpec:
    parser = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tasks", required=True,
                        help=f"comma-separated tasks: {','.join(TASKS)}")
    parser.add_argument("--archs", default=None,
                        help="comma-separated architectures (default: every one the preset configures: "
                             f"{','.join(ARCHITECTURES)} in the built-in presets)")
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
    parser.add_argument("--ray-train", choices=("auto", "always", "multi-worker-only"), default="auto",
                        help="where training nodes run their loop. auto: on a cluster that has GPUs or an "
                             "autoscaler node type with GPUs, every training node as Ray Train workers "
                             "(TorchTrainer: DDP, Train's checkpoints, worker-group restarts after a lost "
                             "worker); on a CPU-only one inside its Tune trial, except nodes with several "
                             "workers (on a CPU machine a worker group costs more to start than a small node "
                             "trains). always: every training node through Ray Train; multi-worker-only: only "
                             "nodes with several workers, one-worker nodes train inside their trial; either "
                             "whatever the cluster")
    parser.add_argument("--ddp-workers", choices=("auto", "preset"), default="auto",
                        help="how many DDP workers (one GPU each) a training node gets on a GPU cluster. auto: "
                             "chosen as the node starts, more for the chains of nodes that bound the grid's makespan "
                             "while GPUs are free, in powers of two up to one machine's GPUs, within the preset's "
                             "resources.<arch>.max_ddp_workers / workers and the batch (grid/ddp_workers.py). preset: "
                             "the preset's workers (default 1). The training is the same at any worker count")
    parser.add_argument("--wait", action="store_true",
                        help="when another grid is running on --storage, wait for it to end instead of stopping "
                             "(one grid per storage at a time)")
    parser.add_argument("--dry-run", action="store_true", help="print the stage graph with resources and exit")
    args = parser.parse_args(argv)
    try:
        tasks = tuple(get_task(t.strip()).name for t in args.tasks.split(",") if t.strip())
        preset = load_preset(args.preset)  # first: its plugins may register architectures and stages
        archs = (tuple(get_architecture(a.strip()).name for a in args.archs.split(",") if a.strip())
                 if args.archs is not None else tuple(a for a in ARCHITECTURES if a in preset.models))
        weights = dict(_parse_weight(w) for w in args.weights)
    except ValueError as err:
        parser.error(str(err))
    left_out = [a for a in archs if a not in preset.models]
    if left_out:
        parser.error(f"--archs {','.join(left_out)}: preset {preset.name!r} has no models entry for "
                     f"{' or '.join(left_out)} (it configures {', '.join(preset.models)})")
    for line in skipped_lines(preset, tasks, archs if args.archs is not None else tuple(ARCHITECTURES)):
        print(line)
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
                    max_failures=args.max_failures, ray_train=args.ray_train, ddp_workers=args.ddp_workers,
                    dry_run=args.dry_run, wait=args.wait)


def skipped_lines(preset: Preset, tasks: Sequence[str], archs: Sequence[str]) -> list[str]:
    """One line per registered architecture or distilled stage the preset leaves out (a plugin's, say): the
    grid skips it. A preset marked ``complete: true`` has refused such gaps when it loaded."""
    from occkd_core.stages import distilled_stages

    lines = [f"preset {preset.name!r} configures no {arch!r} (no models entry): skipped"
             for arch in archs if arch not in preset.models]
    runs = [a for a in archs if a in preset.models]
    lines += [f"preset {preset.name!r} configures no {stage!r} stage for {', '.join(tasks)}: skipped"
              for stage in distilled_stages()
              if not any(preset.has_stage(task, arch, stage) for task in tasks for arch in runs)]
    return lines


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


#: Where `ray up` leaves the cluster config on the head node.
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


def _parse_weight(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise ValueError(f"--weights {text!r}: expected NAME=PATH, e.g. vggface=/data/vgg-face.mat")
    get_pretrained(name)
    return name, path


def main(argv: Sequence[str] | None = None) -> int:
    spec = parse_args(argv)
    if spec.dry_run:
        return run_grid(spec, None)
    from grid.interrupts import GridInterrupted, Interrupts, exit_status

    try:
        interrupts = Interrupts()
    except ValueError as err:  # OCCKD_STOP_GRACE_S
        print(f"error: {err}", file=sys.stderr)
        return 2
    interrupts.install()
    try:
        return run_grid(spec, interrupts)
    except GridInterrupted as stop:  # before any node ran: nothing to close but the parent run, if any
        print(f"\n{stop}: stopped before any node ran; rerun the same command to start again", file=sys.stderr)
        return exit_status(stop.signum)
    finally:
        interrupts.restore()


if __name__ == "__main__":
    sys.exit(main())
