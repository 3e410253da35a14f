"""Whether a data set has enough images in each split for the method to run at all. The grid checks it
before it runs anything (from the sources' labels, in ``--dry-run`` too) and again on the converted store,
so a degenerate data set is refused with its counts instead of failing minutes later inside a library
(the triplet miner, an empty test split). Conversion itself takes any size: tests convert a dozen rows."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from occkd_core.tasks import get_task

#: Fewest images per split: train feeds batches and the triplet miner's pool (spec §6: a pool of anchors,
#: each with a positive and a negative), validation picks the best epoch and KD node, test feeds the
#: McNemar tests. These are floors for running at all, far below what gives meaningful numbers.
MIN_SPLIT_IMAGES = {"train": 8, "val": 2, "test": 2}
#: A triplet needs an anchor and a positive of one class and a negative of another: at least two classes
#: with this many training images each (classification tasks).
MIN_CLASS_IMAGES = 2


def check_split_sizes(labels: Mapping[str, np.ndarray], task: str, source: str) -> None:
    """ValueError naming ``source``, the counts and the minimum when a split or the classes are too few."""
    counts = {split: int(len(labels.get(split, ()))) for split in MIN_SPLIT_IMAGES}
    short = [split for split, minimum in MIN_SPLIT_IMAGES.items() if counts[split] < minimum]
    if short:
        raise ValueError(f"{source}: too few usable images for task {task!r}: {counts} per split, but at least "
                         f"{MIN_SPLIT_IMAGES} are needed (short: {', '.join(short)})")
    info = get_task(task)
    if info.is_classification:
        train = np.asarray(labels["train"])
        per_class = np.bincount(train[train >= 0].astype(np.int64), minlength=info.num_outputs)
        if int((per_class >= MIN_CLASS_IMAGES).sum()) < 2:
            shown = {int(c): int(n) for c, n in enumerate(per_class) if n}
            raise ValueError(f"{source}: task {task!r} has training images per class {shown}; triplets need at "
                             f"least 2 classes with {MIN_CLASS_IMAGES} or more images each")
