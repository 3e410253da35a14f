"""Fusion's linear solvers: CPU seconds per C and per set size on embeddings shaped like the students'
(issue 25, item 3).

Times every solver of ``occkd_core.fusion.LINEAR_SVM_SOLVERS`` (gender-like: 2 classes; FER-like: 8) and
``LINEAR_SVR_SOLVERS`` (age-like: years) at each C, in the pipeline ``fit_fusion`` fits
(``build_fusion_model``: standardisation, then the solver), and marks the one ``linear_solver`` picks.

**The embeddings are synthetic** (no student embeddings are kept on this machine): two "students" see the
same face through one shared 48-d latent factor, each maps it to D dims by its own random linear map, adds
its own noise and a ReLU (the embeddings are post-ReLU pooled activations), and the two are concatenated
(2 x D columns, as ``concat_embeddings``). The class (or the age) shifts the latent factor weakly, so the
classes overlap: a linear SVM reaches ~0.8 validation accuracy on 2 classes, not 1.0.

Each fit runs in a forked child under ``RLIMIT_CPU`` (``--cap`` CPU seconds; the kernel stops it there),
so a solver that does not finish in time costs the cap and reads "> cap". CPU seconds, not wall seconds,
are reported: this VM's 2 cores are shared with other jobs, so wall time says more about the neighbours
than about the solver (wall time and the load average are printed beside them). Reduced setting by
default (about five CPU minutes): a solver that hit the cap on a set is not run on a larger set of the same
width at that C, and libsvm and liblinear's dual (whose work grows with C: the box [0, C] of their dual
variables widens) are not run at a larger C once they hit the cap; ``--no-skip`` runs everything.

    python benchmarks/bench_fusion.py                      # the reduced default
    python benchmarks/bench_fusion.py --cap 60 --rows 1000,2650,10000,25000 --dims 512,4096,8192
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import machine_line, markdown_table  # noqa: E402
from occkd_core.fusion import LINEAR_SVM_SOLVERS, LINEAR_SVR_SOLVERS, build_fusion_model, linear_solver  # noqa: E402

#: FER+'s training-label shares under the majority rule (neutral, happiness, surprise, sadness, anger,
#: disgust, fear, contempt), rounded: the 8-class cases are as unbalanced as FER+.
FER_SHARES = (0.36, 0.30, 0.12, 0.12, 0.08, 0.006, 0.02, 0.006)
LATENT_DIM = 48
VAL_ROWS = 1000


@dataclass(frozen=True)
class Case:
    task: str  # "gender" (2 classes) | "fer" (8) | "age" (years)
    rows: int  # training faces
    dims: int  # concatenated features, 2 x one student's embedding

    @property
    def kind(self) -> str:
        return "regression" if self.task == "age" else "classification"


def synthetic_embeddings(case: Case, num_rows: int, seed: int, signal: float = 0.2,
                         noise: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Features [num_rows, case.dims] (float32, two students' post-ReLU embeddings concatenated) and
    targets [num_rows] (class ids, or ages in years)."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(0.0, 1.0, (num_rows, LATENT_DIM))
    if case.kind == "classification":
        shares = (0.52, 0.48) if case.task == "gender" else FER_SHARES
        targets = rng.choice(len(shares), size=num_rows, p=np.asarray(shares) / sum(shares))
        latent += signal * np.random.default_rng(99).normal(0.0, 1.0, (len(shares), LATENT_DIM))[targets]
    else:
        # UTKFace-like ages: mean ~33, read weakly off the latent face, 1-100 years.
        targets = np.clip(33.0 + 12.0 * latent[:, 0] + rng.normal(0.0, 8.0, num_rows), 1.0, 100.0)
    students = []
    for student in range(2):  # the same two students (maps) for every split; each split's own noise
        maps = np.random.default_rng(1000 + student)
        weights = maps.normal(0.0, 1.0 / np.sqrt(LATENT_DIM), (LATENT_DIM, case.dims // 2))
        bias = maps.normal(0.0, 0.5, case.dims // 2)
        students.append(np.maximum(latent @ weights + bias + rng.normal(0.0, noise, (num_rows, case.dims // 2)), 0.0))
    return np.concatenate(students, axis=1).astype(np.float32), targets


def _fit_in_child(conn, case: Case, solver: str, C: float, data: tuple, cap: int) -> None:
    limit = max(1, int(cap))  # RLIMIT_CPU counts whole seconds
    resource.setrlimit(resource.RLIMIT_CPU, (limit, limit + 5))
    train_x, train_y, val_x, val_y = data
    model = build_fusion_model(case.kind, "linear", C, case.rows, case.dims, solver=solver)
    cpu, wall = time.process_time(), time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(train_x, train_y)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    predicted = model.predict(val_x)
    score = float(np.mean(predicted == val_y)) if case.kind == "classification" else float(np.mean(np.abs(predicted - val_y)))
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    conn.send((cpu, wall, score, converged, _iterations(model[-1])))


def _iterations(estimator) -> int:
    """The most iterations any one binary machine of the fitted solver took (liblinear: passes or Newton
    steps; libsvm: SMO steps)."""
    inner = getattr(estimator, "regressor_", None) or estimator  # TransformedTargetRegressor
    machines = getattr(inner, "estimators_", [inner])  # OneVsRestClassifier
    return int(max(np.max(np.atleast_1d(m.n_iter_)) for m in machines))


def time_fit(case: Case, solver: str, C: float, data: tuple, cap: float) -> tuple[float, float, float, bool, int] | None:
    """(CPU s, wall s, validation accuracy or MAE, converged, iterations) of one fit, or None if it hit
    the CPU cap."""
    context = multiprocessing.get_context("fork")  # the child shares the parent's arrays, no copy
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_fit_in_child, args=(send, case, solver, C, data, cap))
    child.start()
    send.close()
    # The CPU cap ends the child (SIGXCPU closes its end of the pipe: EOF); the wall limit only guards
    # against a child that gets no CPU at all.
    result = None
    if receive.poll(max(600.0, 50 * cap)):
        try:
            result = receive.recv()
        except EOFError:
            pass
    if child.is_alive():
        child.kill()
    child.join()
    return result


def run_case(case: Case, Cs: list[float], cap: float, skip: bool, capped: set, seed: int,
             loads: list[float], only: set[str] | None) -> list[list]:
    train_x, train_y = synthetic_embeddings(case, case.rows, seed)
    val_x, val_y = synthetic_embeddings(case, VAL_ROWS, seed + 1)
    data = (train_x, train_y, val_x, val_y)
    solvers = LINEAR_SVM_SOLVERS if case.kind == "classification" else LINEAR_SVR_SOLVERS
    chosen = linear_solver(case.kind, case.rows, case.dims)
    rows = []
    for solver in (name for name in solvers if only is None or name in only):
        cells, total = [], 0.0
        for C in Cs:
            if skip and (case.task, case.dims, solver, C) in capped:
                cells.append("skipped")
                continue
            load = os.getloadavg()[0]
            result = time_fit(case, solver, C, data, cap)
            if result is None:
                cells.append(f"> {cap:g}")
                total += cap
                capped.add((case.task, case.dims, solver, C))
                if skip and solver != "liblinear_primal":
                    capped.update((case.task, case.dims, solver, larger) for larger in Cs if larger > C)
            else:
                cpu, wall, score, converged, iterations = result
                total += cpu
                score_text = f"{score:.3f}" if case.kind == "classification" else f"{score:.2f}"
                cells.append(f"{cpu:.1f}{'' if converged else '*'} ({score_text})")
                loads.append(load)
            print(f"{case.task} {case.rows} x {case.dims} {solver} C={C:g}: {cells[-1]}"
                  + (f", {iterations} iterations, wall {wall:.1f} s, load {load:.1f}" if result else ""), flush=True)
        # A capped fit counts its cap, so the sum is then a lower bound; a skipped one is not counted.
        summed = f"{'> ' if any(c.startswith('>') for c in cells) else ''}{total:.1f}"
        rows.append([case.task, f"{case.rows:,} x {case.dims:,}", solver + (" **(chosen)**" if solver == chosen else ""),
                     *cells, summed + (" + skipped" if "skipped" in cells else "")])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="gender,age", help="gender (2 classes), fer (8 classes), age (years)")
    parser.add_argument("--rows", default="1000,2650,10000", help="training-set sizes")
    parser.add_argument("--dims", default="512,8192",
                        help="concatenated widths: 512 = 2 x VGG-f, 1024 = 2 x VGG-face, 4096 = 2 x ResNet-50")
    parser.add_argument("--Cs", default="0.1,1,10,100", help="the mid preset's fusion grid")
    parser.add_argument("--cap", type=int, default=10, help="CPU seconds one fit may take")
    parser.add_argument("--solvers", default=None, help="comma-separated solver names (default: all)")
    parser.add_argument("--max-cells", type=int, default=25_000_000,
                        help="skip sets with more rows x dims than this (memory: liblinear copies the set)")
    parser.add_argument("--no-skip", action="store_true", help="run every solver at every C and size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    Cs = [float(c) for c in args.Cs.split(",")]
    print(machine_line())
    print(f"CPU cap {args.cap:g} s per fit; validation: {VAL_ROWS} faces; synthetic embeddings (module docstring)")
    started, rows, capped, loads = time.perf_counter(), [], set(), []
    for task in args.tasks.split(","):
        for dims in (int(d) for d in args.dims.split(",")):
            for num_rows in sorted(int(r) for r in args.rows.split(",")):
                if num_rows * dims > args.max_cells:
                    print(f"skipping {task} {num_rows} x {dims}: over --max-cells", flush=True)
                    continue
                rows += run_case(Case(task, num_rows, dims), Cs, args.cap, not args.no_skip, capped, args.seed,
                                 loads, set(args.solvers.split(",")) if args.solvers else None)
    print(f"\nCPU seconds per fit (validation accuracy, or MAE in years); * = stopped at the iteration cap "
          f"(ConvergenceWarning); > {args.cap:g} = hit the CPU cap. Whole run {time.perf_counter() - started:,.0f} s "
          f"wall; 1-minute load average at the fits' starts {min(loads, default=0):.1f}-{max(loads, default=0):.1f}\n")
    print(markdown_table(["task", "train rows x dims", "solver", *(f"C = {c:g}" for c in Cs), "CPU s, all C run"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
