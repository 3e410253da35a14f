"""Which real data set serves which task, where it lies, and its one-time conversion into a cached store.

Expected layout under ``data_root`` (the datasets' original files, unchanged):

* ``ferplus/fer2013.csv`` (or ``fer2013.csv.gz``) and ``ferplus/fer2013new.csv``: FER+ (task "fer");
* ``affectnet/Manually_Annotated_file_lists/{training,validation}.csv`` and
  ``affectnet/Manually_Annotated_Images/``: AffectNet, optional, joined to FER+ when present;
* ``utkface/UTKFace/*.jpg`` (or ``utkface/*.jpg``): UTKFace (tasks "gender" and "age", one store).

:func:`prepare_real_data` converts once and names the store by a checksum of its inputs: the bytes of
every CSV/list file, the sorted names and sizes of image files (not their bytes: hashing ~300k images
would cost minutes on every call), the loader settings and :data:`CONVERTER_VERSION`. A second call
finds the file, checks it against the size and sha256 recorded when it was written (see
:mod:`occkd_core.data.cache`: a damaged store is converted again, under the same name) and returns; a
changed source file, or other settings, give a new store.

Store of task "fer":

* FER+ alone: FER+'s own splits train/val/test at its native 48×48×1.
* FER+ and AffectNet (joint training, spec §2.2 and §15 #15): train = FER+ train followed by the capped
  AffectNet train (metadata ``train_parts`` gives the row ranges), val = FER+ val, test = FER+ test,
  and an extra split ``test_affectnet`` = AffectNet's official validation set. All images are
  ``union_size``² RGB: FER+ grey is resized with PIL (bilinear) and copied into 3 channels (spec §3.3),
  AffectNet face boxes are cropped and resized to ``union_size``.

Store of tasks "gender" and "age": UTKFace's own 60/20/20 split, at min(``max_input_size``, 200) px:
the largest input the run's networks read, so no batch is shrunk from 200 px at every step.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from occkd_core.data import affectnet
from occkd_core.data.affectnet import load_affectnet
from occkd_core.data.cache import reuse_cached_store, write_cached_store
from occkd_core.data.checks import MiningPlan, check_split_sizes
from occkd_core.data.ferplus import LABEL_RULES, LabelRule, ferplus_split_labels, load_ferplus
from occkd_core.data.synthetic import make_synthetic_faces, synthetic_split_sizes
from occkd_core.data.store import SCHEMA_VERSION, FaceData, FaceSplit
from occkd_core.data.utkface import UTKFACE_SIZE, load_utkface, utkface_split_labels
from occkd_core.files import file_sha256
from occkd_core.tasks import get_task

#: Bump when a loader changes what it produces from the same files, so old cached stores are not reused.
CONVERTER_VERSION = "1"


@dataclass(frozen=True)
class TaskSources:
    """The data sets a task is prepared from: all ``required`` ones, plus each ``optional`` one that is present."""

    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    store_name: str = ""  # cache file prefix; gender and age share "utkface"


REAL_TASK_SOURCES: dict[str, TaskSources] = {
    "fer": TaskSources(required=("ferplus",), optional=("affectnet",), store_name="fer"),
    "gender": TaskSources(required=("utkface",), store_name="utkface"),
    "age": TaskSources(required=("utkface",), store_name="utkface"),
}

#: The keys of find_sources' result that make up each data set.
_SOURCE_KEYS: dict[str, tuple[str, ...]] = {
    "ferplus": ("fer2013", "fer2013new"), "affectnet": ("affectnet",), "utkface": ("utkface",),
}

#: What each data set needs under data_root, for error messages.
SOURCE_LAYOUT: dict[str, str] = {
    "ferplus": "ferplus/fer2013.csv (or fer2013.csv.gz) and ferplus/fer2013new.csv",
    "affectnet": (f"affectnet/{affectnet.LIST_DIR}/training.csv, affectnet/{affectnet.LIST_DIR}/validation.csv "
                  f"and the folder affectnet/{affectnet.IMAGE_DIR}/"),
    "utkface": "utkface/UTKFace/*.jpg (or utkface/*.jpg)",
}


def _locate(data_root: Path) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """Found paths by key, and for each data set with some but not all of its files, what is missing."""
    found: dict[str, Path] = {}
    incomplete: dict[str, list[str]] = {}

    fer_dir = data_root / "ferplus"
    fer_csv = next((fer_dir / name for name in ("fer2013.csv", "fer2013.csv.gz") if (fer_dir / name).is_file()), None)
    votes = fer_dir / "fer2013new.csv"
    if fer_csv is not None and votes.is_file():
        found.update(fer2013=fer_csv, fer2013new=votes)
    elif fer_dir.is_dir():
        incomplete["ferplus"] = (([] if fer_csv else ["fer2013.csv[.gz]"])
                                 + ([] if votes.is_file() else ["fer2013new.csv"]))

    aff_dir = data_root / "affectnet"
    aff_needed = [f"{affectnet.LIST_DIR}/{name}" for name in affectnet.LIST_FILES.values()]
    aff_missing = [name for name in aff_needed if not (aff_dir / name).is_file()]
    aff_missing += [] if (aff_dir / affectnet.IMAGE_DIR).is_dir() else [f"{affectnet.IMAGE_DIR}/"]
    if not aff_missing:
        found["affectnet"] = aff_dir
    elif aff_dir.is_dir():
        incomplete["affectnet"] = aff_missing

    utk_dir = data_root / "utkface"
    for folder in (utk_dir / "UTKFace", utk_dir):
        if folder.is_dir() and any(name.lower().endswith(".jpg") for name in os.listdir(folder)):
            found["utkface"] = folder
            break
    else:
        if utk_dir.is_dir():
            incomplete["utkface"] = ["UTKFace/*.jpg"]
    return found, incomplete


def find_sources(data_root: Path, task: str | None = None) -> dict[str, Path]:
    """Paths of the real data under ``data_root``: keys fer2013, fer2013new, affectnet (folder), utkface (folder).

    Only complete data sets are returned. With ``task``, raise a FileNotFoundError naming what that
    task lacks: a required data set that is absent or incomplete, or an optional one that is incomplete
    (a half-copied AffectNet should not be silently skipped).
    """
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise FileNotFoundError(f"data root {data_root} is not a folder; it should hold "
                                + "; ".join(SOURCE_LAYOUT.values()))
    found, incomplete = _locate(data_root)
    if task is not None:
        sources = _task_sources(task)
        problems = [f"{name} is missing (expected {SOURCE_LAYOUT[name]})"
                    for name in sources.required if _SOURCE_KEYS[name][0] not in found and name not in incomplete]
        problems += [f"{name} is incomplete, it lacks {', '.join(incomplete[name])} (expected {SOURCE_LAYOUT[name]})"
                     for name in (*sources.required, *sources.optional) if name in incomplete]
        if problems:
            raise FileNotFoundError(f"task {task!r} under {data_root}: " + "; ".join(problems))
    return found


def _task_sources(task: str) -> TaskSources:
    get_task(task)  # unknown task names get the registry's error listing the valid ones
    if task not in REAL_TASK_SOURCES:
        raise ValueError(f"task {task!r} has no real data source; tasks with one: {', '.join(REAL_TASK_SOURCES)}")
    return REAL_TASK_SOURCES[task]


# ---------------------------------------------------------------------------------------------- checksums

def _folder_digest(folder: Path) -> str:
    """sha256 of the sorted relative names and sizes of every file under ``folder`` (not their bytes)."""
    entries = []
    for directory, _, files in os.walk(folder):
        for name in files:
            path = Path(directory) / name
            entries.append(f"{path.relative_to(folder).as_posix()}\t{path.stat().st_size}")
    digest = hashlib.sha256()
    for entry in sorted(entries):
        digest.update(entry.encode() + b"\n")
    return digest.hexdigest()


def source_checksums(found: dict[str, Path], names: tuple[str, ...]) -> dict[str, str]:
    """Checksum per data set in ``names`` (module docstring says what is hashed)."""
    sums = {}
    if "ferplus" in names:
        sums["ferplus"] = hashlib.sha256(
            (file_sha256(found["fer2013"]) + file_sha256(found["fer2013new"])).encode()).hexdigest()
    if "affectnet" in names:
        root = found["affectnet"]
        parts = [file_sha256(root / affectnet.LIST_DIR / name) for name in affectnet.LIST_FILES.values()]
        sums["affectnet"] = hashlib.sha256(
            ("".join(parts) + _folder_digest(root / affectnet.IMAGE_DIR)).encode()).hexdigest()
    if "utkface" in names:
        sums["utkface"] = _folder_digest(found["utkface"])
    return sums


# --------------------------------------------------------------------------------------------- conversion

def _fer_as_rgb(split: FaceSplit, out: np.ndarray) -> FaceSplit:
    """FER+ grey [N, 48, 48, 1] written into ``out`` [N, size, size, 3]: PIL bilinear resize, grey copied
    into 3 channels, one image at a time (``out`` may be a memory-mapped file)."""
    size = out.shape[1]
    for index, image in enumerate(split.images[..., 0]):
        if image.shape != (size, size):
            image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
        out[index] = image[..., None]
    return FaceSplit(images=out, expression=split.expression, gender=split.gender, age=split.age)


def _concat_labels(first: FaceSplit, second: FaceSplit, images: np.ndarray) -> FaceSplit:
    """The rows of ``first`` then ``second``, whose images already lie one after the other in ``images``."""
    return FaceSplit(images=images, **{column: np.concatenate([getattr(first, column), getattr(second, column)])
                                       for column in ("expression", "gender", "age")})


def _prefixed(prefix: str, metadata: Mapping[str, str]) -> dict[str, str]:
    return {f"{prefix}.{key}": value for key, value in metadata.items()}


def _convert_fer(found: dict[str, Path], settings: dict[str, Any], scratch: Path) -> FaceData:
    fer = load_ferplus(found["fer2013"], found["fer2013new"], label_rule=settings["label_rule"])
    if "affectnet" not in found:
        return FaceData(name="ferplus", splits=dict(fer.splits), metadata=_prefixed("ferplus", fer.metadata))
    size = settings["union_size"]
    # Every pixel goes into one memory-mapped scratch file, laid out so that each split of the store is
    # one contiguous slice of it: [FER+ train | AffectNet train | AffectNet test | FER+ val | FER+ test].
    # At 224 px that is ~19 GB for the real data, more than many machines' RAM; the store is then written
    # from the file without any copy (write_face_store hands Arrow the slices as they are).
    num_fer = {name: len(split) for name, split in fer.splits.items()}
    pixels: list[np.ndarray] = []

    def allocate(shape: tuple[int, ...]) -> np.ndarray:
        rows = num_fer["train"] + shape[0] + num_fer["val"] + num_fer["test"]
        pixels.append(np.memmap(scratch, dtype=np.uint8, mode="w+", shape=(rows, *shape[1:])))
        return pixels[0][num_fer["train"]:num_fer["train"] + shape[0]]

    aff = load_affectnet(found["affectnet"], image_size=size, cap_per_class=settings["affectnet_cap_per_class"],
                         seed=settings["seed"], allocate=allocate)
    big = pixels[0]
    num_fer_train, num_aff_train = num_fer["train"], len(aff.split("train"))
    fer_train = _fer_as_rgb(fer.split("train"), big[:num_fer_train])
    val_start = len(big) - num_fer["val"] - num_fer["test"]
    splits = {
        "train": _concat_labels(fer_train, aff.split("train"), big[:num_fer_train + num_aff_train]),
        "val": _fer_as_rgb(fer.split("val"), big[val_start:val_start + num_fer["val"]]),
        "test": _fer_as_rgb(fer.split("test"), big[val_start + num_fer["val"]:]),
        "test_affectnet": aff.split("test"),
    }
    # The AffectNet training images must sit right after FER+'s: the union is a view, not a copy.
    assert np.shares_memory(splits["train"].images[num_fer_train:], aff.split("train").images)
    metadata = {
        **_prefixed("ferplus", fer.metadata), **_prefixed("affectnet", aff.metadata),
        "train_parts": json.dumps([["ferplus", 0, num_fer_train],
                                   ["affectnet", num_fer_train, num_fer_train + num_aff_train]]),
    }
    return FaceData(name="ferplus+affectnet", splits=splits, metadata=metadata)


@dataclass(frozen=True)
class _StorePlan:
    path: Path
    found: dict[str, Path]
    settings: dict[str, Any]
    checksums: dict[str, str]


def real_store_path(task: str, data_root: Path, cache_dir: Path, **options: Any) -> Path:
    """Where :func:`prepare_real_data` keeps (or would keep) the store of ``task``, without converting or
    writing anything: its name is a checksum of the source files and the settings."""
    return _plan(task, data_root, cache_dir, **options).path


def prepare_real_data(task: str, data_root: Path, cache_dir: Path, *, label_rule: LabelRule = "majority",
                      union_size: int = 48, seed: int = 0, affectnet_cap_per_class: int = 15000,
                      max_input_size: int | None = None) -> Path:
    """Path of the prepared store for ``task`` in ``cache_dir``, converting the real data only if needed.

    ``label_rule`` (FER+), ``union_size`` and ``affectnet_cap_per_class`` matter only for "fer" with
    AffectNet present; ``seed`` draws the AffectNet cap and the UTKFace split. See the module docstring.
    """
    plan = _plan(task, data_root, cache_dir, label_rule=label_rule, union_size=union_size, seed=seed,
                 affectnet_cap_per_class=affectnet_cap_per_class, max_input_size=max_input_size)
    if reuse_cached_store(plan.path, write=True, sources=_describe(plan)):  # a damaged one is converted again
        return plan.path
    return _convert_and_write(task, plan)


def cached_real_store(task: str, data_root: Path, cache_dir: Path, **options: Any) -> tuple[Path, bool]:
    """For --dry-run: where :func:`prepare_real_data` keeps the store of ``task``, and whether it is there
    and sound. Checked as prepare_real_data checks it; a damaged one is said, not touched: nothing is written."""
    plan = _plan(task, data_root, cache_dir, **options)
    return plan.path, reuse_cached_store(plan.path, write=False, sources=_describe(plan))


def _describe(plan: _StorePlan) -> str:
    return ", ".join(str(path) for _, path in sorted(plan.found.items()))


def _plan(task: str, data_root: Path, cache_dir: Path, *, label_rule: LabelRule = "majority", union_size: int = 48,
          seed: int = 0, affectnet_cap_per_class: int = 15000, max_input_size: int | None = None) -> _StorePlan:
    sources = _task_sources(task)
    if label_rule not in LABEL_RULES:
        raise ValueError(f"unknown FER+ label rule {label_rule!r}; valid rules: {', '.join(LABEL_RULES)}")
    if union_size < 8:
        raise ValueError(f"union_size must be >= 8 pixels, got {union_size}")
    found = find_sources(Path(data_root), task)
    used = (*sources.required, *(name for name in sources.optional if _SOURCE_KEYS[name][0] in found))
    found = {key: found[key] for name in used for key in _SOURCE_KEYS[name]}
    if sources.store_name == "fer":
        settings: dict[str, Any] = {"label_rule": label_rule}
        if "affectnet" in used:
            settings.update(union_size=union_size, seed=seed, affectnet_cap_per_class=affectnet_cap_per_class)
    else:
        settings = {"seed": seed, "split_fractions": [0.6, 0.2, 0.2],
                    "image_size": min(max_input_size or UTKFACE_SIZE, UTKFACE_SIZE)}
    checksums = source_checksums(found, used)
    key = hashlib.sha256(json.dumps({"converter": CONVERTER_VERSION, "schema": SCHEMA_VERSION,
                                     "sources": checksums, "settings": settings}, sort_keys=True).encode())
    path = Path(cache_dir) / f"{sources.store_name}-{key.hexdigest()[:20]}.arrow"
    return _StorePlan(path=path, found=found, settings=settings, checksums=checksums)


def check_planned_splits(task: str, data_root: Path, cache_dir: Path, *, mining: Sequence[MiningPlan] = (),
                         **options: Any) -> None:
    """For ``--dry-run``, before anything is converted: the split sizes a conversion would give, from the
    sources' labels alone (FER+ votes, UTKFace names), checked like a conversion checks them (``mining``: see
    :func:`check_split_sizes`). FER+ joined with AffectNet is checked at conversion only (AffectNet's labels
    need its annotation files read)."""
    plan = _plan(task, data_root, cache_dir, **options)
    if "fer2013new" in plan.found and "affectnet" not in plan.found:
        labels = ferplus_split_labels(plan.found["fer2013new"], label_rule=plan.settings["label_rule"])
    elif "utkface" in plan.found:
        labels = utkface_split_labels(plan.found["utkface"], task, seed=plan.settings["seed"],
                                      split_fractions=plan.settings["split_fractions"])
    else:
        return
    check_split_sizes(labels, task, source=", ".join(str(value) for _, value in sorted(plan.found.items())),
                      mining=mining)


def _convert_and_write(task: str, plan: _StorePlan) -> Path:
    sources = _task_sources(task)
    path, found, settings, checksums = plan.path, plan.found, plan.settings, plan.checksums
    scratch = path.with_name(f".{path.name}.pixels-{os.getpid()}")  # FER+ ∪ AffectNet pixels, see _convert_fer
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if sources.store_name == "fer":
            data = _convert_fer(found, settings, scratch)
        else:
            utk = load_utkface(found["utkface"], seed=settings["seed"], split_fractions=settings["split_fractions"],
                               image_size=settings["image_size"])
            data = FaceData(name="utkface", splits=dict(utk.splits), metadata=_prefixed("utkface", utk.metadata))
        metadata = {
            **data.metadata,
            "source_checksums": json.dumps(checksums, sort_keys=True),
            "source_paths": json.dumps({name: str(value) for name, value in sorted(found.items())}),
            "settings": json.dumps(settings, sort_keys=True),
            "converter_version": CONVERTER_VERSION,
        }
        return write_cached_store(path, FaceData(name=data.name, splits=data.splits, metadata=metadata))
    finally:
        scratch.unlink(missing_ok=True)



#: Bump when the synthetic generator changes what it draws (part of the synthetic store's fingerprint).
SYNTHETIC_VERSION = 1


@dataclass(frozen=True)
class SyntheticStore:
    path: Path
    fingerprint: str  # of the generator's settings: part of every node hash
    num_train: int


def prepare_synthetic_data(num_faces: int, image_size: int, seed: int, cache_dir: Path, *,
                           write: bool = True) -> SyntheticStore:
    """The built-in synthetic faces as a cached store (``synthetic-<fingerprint>.arrow`` in ``cache_dir``),
    drawn and written now if absent or damaged (:mod:`occkd_core.data.cache`) and ``write``; with
    ``write=False`` nothing is written."""
    settings = {"version": SYNTHETIC_VERSION, "num_faces": num_faces, "image_size": image_size, "seed": seed}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"synthetic-{fingerprint}.arrow"
    generator = f"the synthetic generator ({num_faces} faces, {image_size} px, seed {seed})"
    if not reuse_cached_store(path, write=write, sources=generator) and write:
        write_cached_store(path, make_synthetic_faces(num_faces, image_size=image_size, seed=seed))
    return SyntheticStore(path=path, fingerprint=fingerprint, num_train=synthetic_split_sizes(num_faces)[0])

__all__ = ["CONVERTER_VERSION", "REAL_TASK_SOURCES", "SOURCE_LAYOUT", "TaskSources", "cached_real_store",
           "find_sources", "prepare_real_data", "prepare_synthetic_data", "real_store_path", "source_checksums"]
