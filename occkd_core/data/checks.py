"""Whether a data set has enough images in each split for every stage of the method to run. The grid checks
it before it runs anything (from the sources' labels, in ``--dry-run`` too) and again on the converted store,
so a degenerate data set is refused with its counts instead of failing minutes later inside a library (the
triplet miner, scikit-learn, an empty test split). Conversion itself takes any size: tests convert a dozen rows.

What each stage needs, and so the minimums (checked with the stages' own code on tiny inputs):

* every split at least one row: training and the embedding passes run on train; validation picks each
  node's best epoch and the fusion's C (an accuracy or MAE of one row is defined, of none it is not);
  test feeds the report and the paired tests (McNemar, Wilcoxon: one pair suffices).
* classification: two classes among the training rows, for the fusion's SVM (one row each suffices).
  An ε-SVR fits one row.
* triplet KD: every epoch draws a pool of round(ρ·N) training rows (at least 1) and mines, per anchor, a
  positive and a negative in it (spec §7); an anchor that finds none is dropped, but an epoch in which
  every anchor is dropped trains on nothing, and the node fails (on every retry: the draw is seeded). How
  likely that is follows exactly from the training labels and the pool size (:func:`no_triplet_chance`);
  a node may run when the chance over its epochs is at most :data:`MAX_NODE_FAILURE`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from occkd_core.tasks import get_task

#: Fewest rows per split (module docstring): floors for running at all, far below meaningful numbers.
MIN_SPLIT_IMAGES = {"train": 1, "val": 1, "test": 1}
#: Classes a classification task needs among its training rows: the fusion's SVM separates two or more.
MIN_TRAIN_CLASSES = 2
#: The largest chance a triplet-KD node may have of drawing, in one of its epochs, a mining pool in which no
#: anchor finds a triplet (the node then fails, and so do its descendants). A risk the grid accepts, not a size:
#: the rows a data set needs follow from it, the pool fraction, the epochs and the labels.
MAX_NODE_FAILURE = 1e-3


@dataclass(frozen=True)
class MiningPlan:
    """The mining a triplet-KD stage does: a pool of round(``pool_fraction`` · N) rows in each of ``epochs``."""

    pool_fraction: float
    epochs: int
    stage: str  # where it is set, for messages, e.g. "age/vggf/triplet_kd"


def pool_size(num_train: int, pool_fraction: float) -> int:
    """Rows in a mining pool: :func:`occkd_core.mining.draw_pool`'s max(1, round(ρ·N))."""
    return max(1, round(pool_fraction * num_train))


def no_triplet_chance(labels: np.ndarray, pool: int, age_threshold: float | None) -> float:
    """The chance that a pool of ``pool`` rows drawn uniformly without replacement from the training rows
    (``labels``: class ids, or ages with ``age_threshold``) gives no anchor of the training set a triplet
    (spec §7; :func:`occkd_core.mining.mine_hard_triplets` then drops every anchor).

    Classes: that happens exactly when the pool holds a single class. Ages (same = |Δ| < t): with m, M the
    pool's youngest and oldest age, exactly when M − m < t and no training age lies in (m − t, M − t] or in
    [m + t, M + t) (an anchor there has one end of the pool within t and the other t or more away). Summed
    over the pools' (youngest, oldest) ages: the pools inside [m, M] that hold both ends, over all pools."""
    values, counts = np.unique(np.asarray(labels, dtype=np.float64), return_counts=True)
    total = int(counts.sum())
    if not 1 <= pool <= total:
        raise ValueError(f"a pool of {pool} rows cannot be drawn from {total}")
    log_all = _log_comb(total, pool)

    def share(rows: int) -> float:  # C(rows, pool) / C(total, pool)
        return math.exp(_log_comb(rows, pool) - log_all) if rows >= pool else 0.0

    chance = sum(share(int(count)) for count in counts)  # pools of one value: no triplet
    if age_threshold is not None:
        for low in range(len(values)):
            inside = int(counts[low])
            for high in range(low + 1, len(values)):
                if values[high] - values[low] >= age_threshold:
                    break
                inside += int(counts[high])
                m, big = values[low], values[high]
                guarded = ((values > m - age_threshold) & (values <= big - age_threshold)) | (
                    (values >= m + age_threshold) & (values < big + age_threshold))
                if inside < pool or guarded.any():
                    continue
                ends = int(counts[low]), int(counts[high])
                chance += share(inside) - share(inside - ends[0]) - share(inside - ends[1]) + share(inside - sum(ends))
    return min(1.0, max(0.0, chance))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def node_failure_chance(labels: np.ndarray, plan: MiningPlan, age_threshold: float | None) -> float:
    """The chance that one of the node's epochs draws a pool with no triplet."""
    per_epoch = no_triplet_chance(labels, pool_size(len(labels), plan.pool_fraction), age_threshold)
    return -math.expm1(plan.epochs * math.log1p(-per_epoch)) if per_epoch < 1 else 1.0


def rows_needed(labels: np.ndarray, plan: MiningPlan, age_threshold: float | None) -> int | None:
    """The fewest training rows with the same mix of labels (each label's share kept) for which a node's
    failure chance is at most :data:`MAX_NODE_FAILURE`; None if no number of rows suffices (every training
    label within one class / within the age threshold of every other)."""
    values, counts = np.unique(np.asarray(labels, dtype=np.float64), return_counts=True)
    shares = counts / counts.sum()

    def failure(num_rows: int) -> float:
        scaled = np.maximum(1, np.round(shares * num_rows)).astype(np.int64)
        return node_failure_chance(np.repeat(values, scaled), plan, age_threshold)

    if failure(10 ** 7) > MAX_NODE_FAILURE:
        return None
    low, high = len(labels), len(labels)  # low fails, high meets the bound
    while failure(high) > MAX_NODE_FAILURE:
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if failure(middle) <= MAX_NODE_FAILURE else (middle, high)
    return high


def check_split_sizes(labels: Mapping[str, np.ndarray], task: str, source: str,
                      mining: Sequence[MiningPlan] = ()) -> None:
    """ValueError naming ``source``, the split, its rows and what it needs, when a split is too small for a
    stage (module docstring): every split, the classes of a classification task's training rows, and each of
    ``mining`` (the triplet-KD stages that will run on this data)."""
    counts = {split: int(len(labels.get(split, ()))) for split in MIN_SPLIT_IMAGES}
    short = [split for split, minimum in MIN_SPLIT_IMAGES.items() if counts[split] < minimum]
    if short:
        raise ValueError(f"{source}: too few usable images for task {task!r}: {counts} per split, but at least "
                         f"{MIN_SPLIT_IMAGES} are needed (short: {', '.join(short)})")
    info = get_task(task)
    train = np.asarray(labels["train"])
    if info.is_classification:
        train = train[train >= 0]
        per_class = np.bincount(train.astype(np.int64), minlength=info.num_outputs)
        if int((per_class > 0).sum()) < MIN_TRAIN_CLASSES:
            shown = {int(c): int(n) for c, n in enumerate(per_class) if n}
            raise ValueError(f"{source}: task {task!r} has training images per class {shown}; the fusion's SVM and "
                             f"triplet mining need at least {MIN_TRAIN_CLASSES} classes in the train split")
    threshold = info.age_threshold
    for plan in mining:
        failure = node_failure_chance(train, plan, threshold)
        if failure <= MAX_NODE_FAILURE:
            continue
        pool = pool_size(len(train), plan.pool_fraction)
        per_epoch = no_triplet_chance(train, pool, threshold)
        triplet = (f"a positive under {threshold:g} years from the anchor's age and a negative {threshold:g} or more "
                   "away" if threshold is not None else "a positive of the anchor's class and a negative of another")
        needed = rows_needed(train, plan, threshold)
        needs = (f"with these labels in the same proportions the train split needs at least {needed} rows"
                 if needed is not None else "no number of rows with these labels suffices (no anchor can find both)")
        raise ValueError(
            f"{source}: task {task!r}: the train split has {len(train)} rows, too few for {plan.stage}: a mining "
            f"pool of {pool} rows (pool_fraction {plan.pool_fraction:g}) gives no anchor a triplet ({triplet}) "
            f"with probability {per_epoch:.3g}, so one of its {plan.epochs} epochs trains on nothing and the node "
            f"fails with probability {failure:.3g} (the grid accepts {MAX_NODE_FAILURE:g}); {needs}")
