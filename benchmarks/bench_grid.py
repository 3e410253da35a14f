"""The grid end to end: wall time and per-node overhead (issue 5, targets 4 and 5).

Runs ``grid/run_all.py`` from a fresh working directory (new storage, new MLflow store, so every node
trains), timing the whole command, and reads the timeline the grid writes
(``reports/<experiment>/timeline.csv`` and ``overheads.json``, see :mod:`grid.timeline`):

* ready -> first step: from the searcher handing a training node to Tune (parents done, slot free) to
  its first optimiser step;
* last step -> child start: from a node's last optimiser step (a fusion node: its end) to the start of
  the child it released, when that child did not wait for a slot;
* last step -> next node start: the same, to whichever node took the slot it freed (on a busy machine
  most children wait while other ready nodes take the slot, so this one counts every slot change).

    python benchmarks/bench_grid.py                                   # the smoke grid, all tasks
    python benchmarks/bench_grid.py --tasks gender --archs vggf --ray-train always   # Train worker groups
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, machine_line, markdown_table  # noqa: E402


def run(tasks: str, archs: str | None, preset: str, ray_train: str, keep: Path | None) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="occkd-bench-")) if keep is None else keep
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(REPO / "grid" / "run_all.py"), "--tasks", tasks, "--preset", preset,
               "--ray-train", ray_train]
    if archs:
        command += ["--archs", archs]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
        raise SystemExit(f"the grid failed (exit {done.returncode}) in {workdir}")
    report = next((workdir / "occkd_runs" / "reports").iterdir())
    stats = json.loads((report / "overheads.json").read_text())
    nodes = int(next(line for line in done.stdout.splitlines() if " nodes: " in line).split()[0])
    return {"wall": wall, "nodes": nodes, "stats": stats, "workdir": workdir,
            "summary": next((line for line in done.stdout.splitlines() if line.startswith("per-node overhead")), "")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="fer,gender,age")
    parser.add_argument("--archs", default=None, help="default: every architecture")
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--ray-train", choices=("auto", "always", "multi-worker-only"), default="auto")
    parser.add_argument("--workdir", type=Path, default=None, help="run here instead of a new temporary folder")
    args = parser.parse_args(argv)
    print(machine_line())
    result = run(args.tasks, args.archs, args.preset, args.ray_train, args.workdir)
    stats = result["stats"]
    start, handoff = list(stats["start"].values()), list(stats["handoff"].values())
    turnover = list(stats["turnover"].values())

    def spread(values: list[float]) -> str:
        if not values:
            return "n/a"
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
        return f"{statistics.median(values):.1f} s (quartiles {quartiles[0]:.1f}-{quartiles[2]:.1f}, n={len(values)})"

    print(f"\n`python grid/run_all.py --tasks {args.tasks}"
          + (f" --archs {args.archs}" if args.archs else "") + f" --preset {args.preset} --ray-train {args.ray_train}`"
          f" in {result['workdir']}\n")
    print(markdown_table(["measure", "value"], [
        ["nodes", result["nodes"]],
        ["wall time of the command", f"{result['wall']:.0f} s ({result['wall'] / 60:.1f} min)"],
        ["ready -> first step, median", spread(start)],
        ["last step -> child start, median", spread(handoff)],
        ["children that waited for a slot (left out)", stats["waited_for_slot"]],
        ["last step -> next node start on the freed slot, median", spread(turnover)],
    ]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
