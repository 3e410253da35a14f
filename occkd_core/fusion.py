"""Fusion of the two distilled students: an SVM / ε-SVR on their concatenated embeddings (spec §8, §15 #27-29).

The features are the embeddings of the standard-KD student and of the triplet-KD student (same
architecture), extracted from the occluded training images; C is chosen on the validation split.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np
from sklearn.base import ClassifierMixin, RegressorMixin
from sklearn.compose import TransformedTargetRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, mean_absolute_error
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, SVR, LinearSVC, LinearSVR

from occkd_core.stages import CONTROL_FUSION
from occkd_core.tasks import TaskKind

#: J's grid for C: 10^-1 … 10^3, going up by a factor of 10 (spec §8).
FUSION_C_GRID: tuple[float, ...] = (0.1, 1.0, 10.0, 100.0, 1000.0)

_KERNELS: tuple[str, ...] = ("linear", "rbf", "poly", "sigmoid")
_DEFAULT_KERNEL: dict[str, str] = {"classification": "linear", "regression": "rbf"}


# -- the linear solvers (spec §15 #27 and #28), chosen by measurement: benchmarks/RESULTS.md §12 -----------

# liblinear stops after max_iter passes over the data (dual) or Newton steps (primal), with a
# ConvergenceWarning that fit_fusion records. The converging fits of the bench needed at most 755 passes
# (dual) and 665 Newton steps (primal, near rows = dims); the cap ends fits that would not converge (the
# dual with many more faces than dims at C >= 1) 20 times sooner than the former cap of 20,000.
_LIBLINEAR_MAX_ITER = 1000

#: Each maps C to an unfitted one-vs-rest linear SVM (spec §15 #27): LinearSVC is one-vs-rest natively;
#: libsvm's SVC is one-vs-one inside whatever its decision_function_shape says, so its entry wraps the
#: binary SVC in OneVsRestClassifier. benchmarks/bench_fusion.py times every entry.
LINEAR_SVM_SOLVERS: dict[str, Callable[[float], ClassifierMixin]] = {
    # liblinear's dual coordinate descent (squared hinge): a pass costs rows x dims.
    "liblinear_dual": lambda C: LinearSVC(C=C, dual=True, max_iter=_LIBLINEAR_MAX_ITER, random_state=0),
    # liblinear's primal trust-region Newton method, same loss.
    "liblinear_primal": lambda C: LinearSVC(C=C, dual=False, max_iter=_LIBLINEAR_MAX_ITER, random_state=0),
    # libsvm's SMO on a linear kernel (hinge loss), one binary SVC per class: spec §15 #27's "for small sets".
    "libsvm": lambda C: OneVsRestClassifier(SVC(C=C, kernel="linear")),
}

#: Each maps C to an unfitted linear ε-SVR (spec §15 #28 "also try a linear kernel"), ε = 0.1 years.
LINEAR_SVR_SOLVERS: dict[str, Callable[[float], RegressorMixin]] = {
    # liblinear regularises its intercept like any weight (it is one more feature, of value
    # intercept_scaling), where SVR(kernel="linear") leaves it free. On raw years that pulls the
    # intercept towards 0: 6.7 years low at C = 0.1 on 600 faces aged 20-80 around 50. Centred on the
    # training mean, the targets leave an intercept of a fraction of a year, whose penalty no longer
    # matters, and the two solvers agree (tests/test_fusion.py). A large intercept_scaling instead
    # shrinks the penalty but slowed the dual's convergence tenfold and more.
    "liblinear_dual": lambda C: TransformedTargetRegressor(
        regressor=LinearSVR(C=C, epsilon=0.1, loss="epsilon_insensitive", dual=True,
                            max_iter=_LIBLINEAR_MAX_ITER, random_state=0),
        transformer=StandardScaler(with_std=False)),  # centres only: ε stays 0.1 years
    "libsvm": lambda C: SVR(C=C, kernel="linear", epsilon=0.1),
}

# The dual fits the SVM in 29-484 passes at every C while the faces number up to ~1.5x the dims
# (measured at 0.12x to 1.46x); from 1.95x on it stopped unconverged at the 1000-pass cap at C >= 1,
# where the primal Newton method converged (0.3-47 s per C; RESULTS.md §12). The boundary sits between
# the two measured ratios, on synthetic embeddings.
_DUAL_UP_TO_ROWS_PER_DIM = 1.5


def linear_solver(kind: TaskKind, num_rows: int, num_features: int) -> str:
    """The key of LINEAR_SVM_SOLVERS (classification) or LINEAR_SVR_SOLVERS (regression) for ``num_rows``
    training faces x ``num_features`` dims: the fastest one in benchmarks/RESULTS.md §12, from the shape of
    the set (not its size alone: what makes a solver slow is the ratio of faces to dims, and C)."""
    if kind == "classification":
        # Few faces for their dims (gender at mid: 2,650 faces x 8,192): the dual's passes are cheap and
        # few (3.4 s per C), where the primal took up to 30x longer at some C and libsvm hit the 10 s cap.
        # Many faces for their dims (FER+: 25k x 512): the primal at 24-28 s per C, the dual over 60 s.
        return "liblinear_dual" if num_rows <= _DUAL_UP_TO_ROWS_PER_DIM * num_features else "liblinear_primal"
    # ε-insensitive loss has no primal solver in liblinear; libsvm was slower at every measured size.
    return "liblinear_dual"


@dataclass(frozen=True)
class FusionResult:
    """The fusion model fitted at the C with the best validation score, and the score of every C."""

    model: Pipeline  # StandardScaler + the SVM (classification) or ε-SVR (regression), build_fusion_model
    C: float
    val_score: float  # accuracy (classification) or -MAE (regression) at the chosen C
    val_scores: dict[float, float] = field(default_factory=dict)  # C -> validation score
    # C -> False where liblinear stopped at its iteration cap (the score is then the unconverged fit's)
    converged: dict[float, bool] = field(default_factory=dict)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Class ids or ages for features [N, D1 + D2]."""
        features = np.asarray(features)
        _check_features("features", features)
        return self.model.predict(features)


def _check_features(name: str, features: np.ndarray) -> None:
    if features.ndim != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {features.shape}")
    if not np.issubdtype(features.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {features.dtype}")
    bad_rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if bad_rows.size:
        raise ValueError(
            f"{name} contain NaN or inf in {bad_rows.size} of {features.shape[0]} rows (first: row {bad_rows[0]}); "
            "the embedding pass produced non-finite values, check the student checkpoints"
        )


def _check_targets(name: str, targets: np.ndarray, num_rows: int, kind: TaskKind) -> None:
    if targets.shape != (num_rows,):
        raise ValueError(f"{name} must be 1-D with {num_rows} entries (one per feature row), got shape {targets.shape}")
    if not np.all(np.isfinite(targets.astype(float))):
        raise ValueError(f"{name} contain NaN or inf")
    if kind == "classification" and not np.array_equal(targets, np.round(targets)):
        raise ValueError(f"{name} must be integer class ids for classification; for age use kind='regression'")


def concat_embeddings(*embeddings: np.ndarray) -> np.ndarray:
    """Concatenate per-image embeddings [N, D1], [N, D2], … into fusion features [N, D1 + D2 + …]."""
    if not embeddings:
        raise ValueError("concat_embeddings needs at least one embedding array")
    arrays = [np.asarray(e) for e in embeddings]
    for i, array in enumerate(arrays):
        if array.ndim != 2:
            raise ValueError(f"embedding {i} must be 2-D [N, D], got shape {array.shape}")
    counts = [a.shape[0] for a in arrays]
    if len(set(counts)) > 1:
        raise ValueError(
            f"embeddings have different numbers of images {counts}; they must come from the same images in the same order"
        )
    return np.concatenate(arrays, axis=1)


def build_fusion_model(kind: TaskKind, kernel: str, C: float, num_rows: int, num_features: int,
                       solver: str | None = None) -> Pipeline:
    """The unfitted pipeline fit_fusion fits at one C: standardisation, then the SVM or ε-SVR. ``solver``
    names a linear solver (LINEAR_SVM_SOLVERS / LINEAR_SVR_SOLVERS) instead of :func:`linear_solver`'s choice."""
    # Standardise on the training embeddings: the two students' embeddings can differ in scale,
    # and an SVM's C only means something on comparable features (spec §15 #27).
    if kernel == "linear":
        solvers = LINEAR_SVM_SOLVERS if kind == "classification" else LINEAR_SVR_SOLVERS
        solver = linear_solver(kind, num_rows, num_features) if solver is None else solver
        if solver not in solvers:
            raise ValueError(f"unknown linear {kind} solver {solver!r}; valid solvers: {', '.join(solvers)}")
        estimator = solvers[solver](C)
    elif solver is not None:
        raise ValueError(f"solver {solver!r} is for the linear kernel; kernel {kernel!r} is always libsvm's")
    elif kind == "classification":
        estimator = SVC(C=C, kernel=kernel, gamma="scale")
    else:
        # ε-SVR with scikit-learn's defaults (spec §15 #28): the PDF's "ε = 0" is read as the default 0.1.
        estimator = SVR(C=C, kernel=kernel, gamma="scale", epsilon=0.1)
    return make_pipeline(StandardScaler(), estimator)


def _score(kind: TaskKind, targets: np.ndarray, predictions: np.ndarray) -> float:
    if kind == "classification":
        return float(accuracy_score(targets, predictions))
    return -float(mean_absolute_error(targets, predictions))


def _stopped_at_cap(model: object) -> bool:
    """Whether a fitted fusion model (Pipeline, TransformedTargetRegressor, OneVsRestClassifier, liblinear or
    libsvm estimator) stopped at its iteration cap. Read from the fitted model rather than from the
    ConvergenceWarning scikit-learn issues, as warnings are process-wide and fits run in threads."""
    if isinstance(model, Pipeline):
        return _stopped_at_cap(model.steps[-1][1])
    if isinstance(model, TransformedTargetRegressor):
        return _stopped_at_cap(model.regressor_)
    if isinstance(model, OneVsRestClassifier):
        return any(_stopped_at_cap(estimator) for estimator in model.estimators_)
    if isinstance(model, (LinearSVC, LinearSVR)):  # liblinear warns exactly where an iteration count reaches its cap
        return int(np.max(model.n_iter_)) >= model.max_iter
    return getattr(model, "fit_status_", 0) == 1  # libsvm's "reached max_iter" (never, at its default of no cap)


@dataclass(frozen=True)
class _Fit:
    """One C's fitted model, whether it stopped at its cap, and its validation score."""

    model: Pipeline
    converged: bool
    score: float


class _Task(NamedTuple):
    """One fit: a model of ``kind`` and ``kernel`` at ``C`` on (features, targets) of train, scored on val."""

    kind: TaskKind
    kernel: str
    C: float
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]


def _fit_one(task: _Task) -> _Fit:
    model = build_fusion_model(task.kind, task.kernel, task.C, *task.train[0].shape)
    model.fit(*task.train)
    return _Fit(model, not _stopped_at_cap(model), _score(task.kind, task.val[1], model.predict(task.val[0])))


def _fit_all(tasks: Sequence[_Task], jobs: int) -> list[_Fit]:
    """``_fit_one(task)`` for every task, in order, on ``jobs`` threads: liblinear and libsvm release the GIL
    while they fit, so C values and models fit side by side on a node's CPUs (each fit is single-threaded).
    Results do not depend on ``jobs``: every fit is deterministic and independent of the others."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    # scikit-learn's own ConvergenceWarning is replaced by fit_fusion's, which names C and the set's shape.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if jobs == 1 or len(tasks) == 1:
            return [_fit_one(task) for task in tasks]
        with ThreadPoolExecutor(max_workers=min(jobs, len(tasks)), thread_name_prefix="occkd-fusion") as pool:
            return list(pool.map(_fit_one, tasks))


@dataclass(frozen=True)
class _Problem:
    """A checked fusion problem: features and targets of train and val, the kind, kernel and C grid."""

    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    kind: TaskKind
    kernel: str
    grid: list[float]


def _problem(train_features: np.ndarray, train_targets: np.ndarray, val_features: np.ndarray,
             val_targets: np.ndarray, kind: TaskKind, Cs: Sequence[float], kernel: str | None) -> _Problem:
    if kind not in _DEFAULT_KERNEL:
        raise ValueError(f"unknown task kind {kind!r}; valid kinds: {', '.join(_DEFAULT_KERNEL)}")
    kernel = _DEFAULT_KERNEL[kind] if kernel is None else kernel
    if kernel not in _KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; valid kernels: {', '.join(_KERNELS)}")
    grid = sorted({float(c) for c in Cs})
    if not grid or not all(c > 0 and math.isfinite(c) for c in grid):
        raise ValueError(f"Cs must be a non-empty sequence of finite numbers > 0, got {list(Cs)}")

    train_features, val_features = np.asarray(train_features), np.asarray(val_features)
    train_targets, val_targets = np.asarray(train_targets), np.asarray(val_targets)
    _check_features("train_features", train_features)
    _check_features("val_features", val_features)
    if val_features.shape[1] != train_features.shape[1]:
        raise ValueError(
            f"val_features have {val_features.shape[1]} dims but train_features have {train_features.shape[1]}; "
            "build both with the same students, concatenated in the same order"
        )
    _check_targets("train_targets", train_targets, train_features.shape[0], kind)
    _check_targets("val_targets", val_targets, val_features.shape[0], kind)
    if kind == "classification" and np.unique(train_targets).size < 2:
        raise ValueError(f"train_targets hold a single class {np.unique(train_targets).tolist()}; an SVM needs two or more")
    return _Problem((train_features, train_targets), (val_features, val_targets), kind, kernel, grid)


def _tasks(problem: _Problem) -> list[_Task]:
    return [_Task(problem.kind, problem.kernel, C, problem.train, problem.val) for C in problem.grid]


def _select(problem: _Problem, fits: Sequence[_Fit]) -> FusionResult:
    """The model with the best validation score (a tie goes to the smaller C), warning of any C whose fit
    stopped at its iteration cap."""
    num_rows, num_features = problem.train[0].shape
    best: _Fit | None = None
    best_C = problem.grid[0]
    for C, fit in zip(problem.grid, fits):
        if not fit.converged:
            warnings.warn(f"the fusion's {problem.kind} model stopped at its iteration cap at C = {C:g} "
                          f"({_LIBLINEAR_MAX_ITER}) on {num_rows} x {num_features} features; its "
                          "validation score is the unconverged fit's (FusionResult.converged)", ConvergenceWarning,
                          stacklevel=3)
        if best is None or fit.score > best.score:  # strict: a tie keeps the smaller C seen first
            best, best_C = fit, C
    assert best is not None  # the grid is non-empty and every score is finite
    return FusionResult(model=best.model, C=best_C, val_score=best.score,
                        val_scores={C: fit.score for C, fit in zip(problem.grid, fits)},
                        converged={C: fit.converged for C, fit in zip(problem.grid, fits)})


def fit_fusion(
    train_features: np.ndarray,
    train_targets: np.ndarray,
    val_features: np.ndarray,
    val_targets: np.ndarray,
    *,
    kind: TaskKind,
    Cs: Sequence[float] = FUSION_C_GRID,
    kernel: str | None = None,
    jobs: int = 1,
) -> FusionResult:
    """Fit an SVM (classification) or ε-SVR (regression) for every C on the training features, keep the one with the best validation score.

    ``kernel`` defaults to ``"linear"`` (a one-vs-rest linear SVM, solver by :func:`linear_solver`) for
    classification and ``"rbf"`` for regression.
    Ties in validation score go to the smaller C (the simpler model). The kept model is the one
    fitted on the training features at that C; it is not refitted on training + validation.
    ``jobs`` threads fit the C values side by side; the result is the same for any ``jobs``.
    """
    problem = _problem(train_features, train_targets, val_features, val_targets, kind, Cs, kernel)
    return _select(problem, _fit_all(_tasks(problem), jobs))


# -- the fusion node's models (spec §8; J Table 4) ----------------------------------------------------------

@dataclass(frozen=True)
class FusionVariant:
    """One model the fusion step fits: the distilled students whose embeddings it concatenates, and its kernel."""

    name: str  # "fusion", "fusion_<kernel>", "<stage>_svm", "control_fusion", "student_svm" (fusion_variants)
    members: tuple[str, ...]  # the models whose embeddings it concatenates, in registry order
    kernel: str | None  # None: the task's default (linear SVM / RBF ε-SVR)


def fusion_variants(distilled: Sequence[str], svr_kernels: Sequence[str | None] = (None,), *,
                    controls: Sequence[str] = (), student: str | None = None) -> list[FusionVariant]:
    """"fusion" is the papers' model, every distilled student's embedding concatenated, with the first
    kernel; each further ε-SVR kernel (age) gives "fusion_<kernel>"; each distilled student alone gives
    "<stage>_svm", the single-embedding SVMs of the journal's Table 4. occkd's controls, with the first
    kernel: "control_fusion", the teacher-free ``controls``' embeddings concatenated (an ensemble with no
    teacher), and "<student>_svm", the same SVM on the student's own embedding (an SVM with no teacher)."""
    members = tuple(distilled)
    variants = [FusionVariant("fusion", members, svr_kernels[0])]
    variants += [FusionVariant(f"fusion_{kernel}", members, kernel) for kernel in svr_kernels[1:]]
    variants += [FusionVariant(f"{stage}_svm", (stage,), svr_kernels[0]) for stage in members]
    if controls:
        variants.append(FusionVariant(CONTROL_FUSION, tuple(controls), svr_kernels[0]))
    if student is not None:
        variants.append(FusionVariant(f"{student}_svm", (student,), svr_kernels[0]))
    return variants


@dataclass(frozen=True)
class FusedModel:
    """A fitted fusion variant and its outputs on every split it was asked to predict."""

    variant: FusionVariant
    fit: FusionResult
    outputs: dict[str, np.ndarray]  # split -> [N, K] one-hot class decisions, or [N, 1] ages


def decision_outputs(predicted: np.ndarray, num_outputs: int) -> np.ndarray:
    """SVM decisions as [N, K] one-hot "logits" (so accuracy and McNemar read them like a network's), or
    SVR ages as [N, 1]."""
    if num_outputs == 1:
        return np.asarray(predicted, dtype=np.float32).reshape(-1, 1)
    one_hot = np.zeros((len(predicted), num_outputs), dtype=np.float32)
    one_hot[np.arange(len(predicted)), np.asarray(predicted).astype(np.int64)] = 1.0
    return one_hot


def fit_fusion_variants(embeddings: Mapping[str, Mapping[str, np.ndarray]], labels: Mapping[str, np.ndarray],
                        variants: Sequence[FusionVariant], *, kind: TaskKind, num_outputs: int,
                        Cs: Sequence[float] = FUSION_C_GRID, predict_splits: Sequence[str] = ("test",),
                        jobs: int = 1) -> list[FusedModel]:
    """Fit every variant on the "train" split's embeddings (stage -> split -> [N, D]), choose C on "val",
    and predict ``predict_splits``. ``jobs`` threads fit every variant's C values side by side (one queue
    of variant x C fits, so a node's CPUs stay busy to the end); the models are the same for any ``jobs``."""
    features, problems = [], []
    for variant in variants:
        features.append({split: concat_embeddings(*(embeddings[stage][split] for stage in variant.members))
                         for split in ("train", "val", *predict_splits)})
        problems.append(_problem(features[-1]["train"], labels["train"], features[-1]["val"], labels["val"],
                                 kind, Cs, variant.kernel))
    # The largest fits first (more features, then larger C: liblinear's slowest), so none starts last alone.
    tasks = [task for problem in problems for task in _tasks(problem)]
    order = sorted(range(len(tasks)), key=lambda k: (-tasks[k].train[0].shape[1], -tasks[k].C))
    by_task = dict(zip(order, _fit_all([tasks[k] for k in order], jobs)))
    fused, k = [], 0
    for variant, problem, split_features in zip(variants, problems, features):
        fit = _select(problem, [by_task[k + j] for j in range(len(problem.grid))])
        k += len(problem.grid)
        outputs = {split: decision_outputs(fit.predict(split_features[split]), num_outputs)
                   for split in predict_splits}
        fused.append(FusedModel(variant=variant, fit=fit, outputs=outputs))
    return fused
