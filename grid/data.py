"""The data each task trains on, prepared once as memory-mappable Arrow files on the storage path.

With no data root, every task uses the built-in synthetic faces (one store holds labels for all
three tasks). With ``--data-root DIR``, the data sets are read in their authors' formats from DIR
(``ferplus/``, ``affectnet/``, ``utkface/``; see :func:`occkd_core.data.sources.find_sources`) and
converted once into stores cached on the storage path by the source files' checksums. A cached store
is checked before it is reused, and a damaged one rebuilt under the same name (so the same node hashes).
Both caches are the core's (:mod:`occkd_core.data.sources`, :mod:`occkd_core.data.cache`); this module
only picks the preset's settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from occkd_core.data import open_face_store
from occkd_core.data.checks import MiningPlan, check_split_sizes
from grid.artifacts import StorageLayout
from occkd_core.data.sources import cached_real_store, check_planned_splits, prepare_real_data, prepare_synthetic_data
from occkd_core.data.synthetic import synthetic_split_labels
from occkd_core.data.utkface import SPLIT_NAMES
from occkd_core.presets import Preset


@dataclass(frozen=True)
class PreparedData:
    path: Path
    fingerprint: str
    num_train: int  # for the scheduler's cost model; 0 when a dry run finds a store not yet converted


def mining_plans(preset: Preset, task: str, archs: Sequence[str]) -> list[MiningPlan]:
    """What the triplet-KD stages of ``task`` × ``archs`` will draw from the training rows (their distinct
    pool fractions and epochs), for the data check."""
    plans = {}
    for arch in (a for a in archs if preset.has_stage(task, a, "triplet_kd")):
        for spec in preset.grid(task, arch, "triplet_kd"):
            plans.setdefault((spec.pool_fraction, spec.epochs), MiningPlan(
                pool_fraction=spec.pool_fraction, epochs=spec.epochs, stage=f"{task}/{arch}/triplet_kd"))
    return list(plans.values())


def prepare_data(preset: Preset, tasks: list[str], storage: Path, data_root: Path | None = None,
                 *, write: bool = True, archs: Sequence[str] | None = None) -> dict[str, PreparedData]:
    """Per task, the prepared store (converted now if absent and ``write``; with ``write=False`` nothing
    is converted or written, for --dry-run), its fingerprint and training-set size. Each task's splits are
    checked for what every stage needs (occkd_core.data.checks), the triplet-KD stages of ``archs`` (default:
    every architecture of the preset) included."""
    cache = StorageLayout(Path(storage)).data
    archs = list(preset.models) if archs is None else list(archs)
    if data_root is None:
        if preset.data.source != "synthetic":
            raise ValueError(f"preset {preset.name!r} trains on real data: pass --data-root DIR")
        settings = preset.data
        for task in tasks:  # the labels come before the pixels: checked without drawing a face
            check_split_sizes(synthetic_split_labels(settings.num_faces, task, seed=settings.seed), task,
                              source=f"preset {preset.name!r}: {settings.num_faces} synthetic faces",
                              mining=mining_plans(preset, task, archs))
        store = prepare_synthetic_data(settings.num_faces, settings.image_size, settings.seed, cache, write=write)
        return {task: PreparedData(store.path, store.fingerprint, store.num_train) for task in tasks}
    root = Path(data_root)
    if not root.is_dir():
        raise ValueError(f"data root {str(root)!r} is not a readable directory")
    # Every architecture of the preset, not only this run's: a later run with more --archs then finds
    # the same store and the same node hashes. UTKFace and the FER+ ∪ AffectNet union are stored at this
    # size (AffectNet crops are resized once from their originals, not upsampled from 48 px per batch);
    # FER+ alone stays at its native 48 px, which every network resizes on the device.
    max_input_size = max(settings.input_size for settings in preset.models.values())
    options = {"max_input_size": max_input_size, "union_size": max_input_size, "label_rule": preset.data.label_rule}
    prepared = {}
    for task in tasks:
        mining = mining_plans(preset, task, archs)
        if write:
            path, ready = prepare_real_data(task, root, cache, **options), True
        else:  # a damaged store is said and left: as with none, the sources' labels are checked below
            path, ready = cached_real_store(task, root, cache, **options)
        if ready:  # converted now or before: its splits are checked for this task too
            store = open_face_store(path)
            check_split_sizes({name: store.split(name).labels(task) for name in SPLIT_NAMES}, task, source=str(path),
                              mining=mining)
            num_train = len(store.split("train"))
        else:  # a dry run before the conversion (or a reconversion): the sources' labels say what it would give
            check_planned_splits(task, root, cache, mining=mining, **options)
            num_train = 0
        prepared[task] = PreparedData(path, path.stem, num_train)
    return prepared
