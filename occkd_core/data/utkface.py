"""UTKFace from its original folder of aligned, cropped faces, spec §2.3.

Labels come from the file names, ``age_gender_race_datetime.jpg`` (or ``.jpg.chip.jpg`` in the
"crop_part1" release): age in years, gender 0 male / 1 female; race is not used. A name is malformed,
skipped and counted, unless it has exactly these four fields, an integer age in 0..130, gender 0 or 1
and an integer race (the datetime field may be anything non-empty). Files not ending in ``.jpg`` are
ignored (and counted).

Split (spec §15 #19): the valid names are sorted, so the split does not depend on directory order,
then permuted with ``numpy.random.default_rng(seed)``; the first round(0.6·N) go to train, the next
round(0.2·N) to val, the rest to test. On the paper's 23,689 files this gives its 14,213 / 4,738 / 4,738.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from occkd_core.data.decode import decode_faces
from occkd_core.data.store import MAX_AGE, FaceData, FaceSplit

UTKFACE_SIZE = 200
SPLIT_NAMES = ("train", "val", "test")
_SUFFIXES = (".jpg.chip.jpg", ".jpg")  # longest first


def _is_int(text: str) -> bool:
    return text.isascii() and text.isdigit()  # isdigit alone accepts "²", which int() refuses


def parse_utkface_name(file_name: str) -> tuple[int, int] | None:
    """(age, gender) from a UTKFace file name, or None if the name is malformed (module docstring)."""
    lower = file_name.lower()
    suffix = next((suffix for suffix in _SUFFIXES if lower.endswith(suffix)), None)
    if suffix is None:
        return None
    fields = file_name[: -len(suffix)].split("_")
    if len(fields) != 4:
        return None
    age, gender, race, datetime = fields
    if not (_is_int(age) and _is_int(race) and gender in ("0", "1") and datetime):
        return None
    if int(age) > MAX_AGE:
        return None
    return int(age), int(gender)


def split_rows(num_rows: int, fractions: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    """Row indices of train/val/test: a seeded permutation, cut after round(f0·N) and round(f1·N) more rows."""
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"split_fractions must be 3 non-negative numbers (train, val, test) summing to 1, "
                         f"got {fractions}")
    order = np.random.default_rng(seed).permutation(num_rows)
    num_train = round(fractions[0] * num_rows)
    num_val = min(round(fractions[1] * num_rows), num_rows - num_train)
    return dict(zip(SPLIT_NAMES, np.split(order, [num_train, num_train + num_val])))


def utkface_split_labels(folder: Path, task: str, *, seed: int = 0,
                         split_fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> dict[str, np.ndarray]:
    """Per split, the gender or age labels :func:`load_utkface` would give, from the file names alone
    (images that turn out unreadable are not known without decoding them)."""
    names = sorted(entry.name for entry in Path(folder).iterdir() if entry.is_file())
    parsed = [parse_utkface_name(name) for name in names if name.lower().endswith(".jpg")]
    values = np.array([age if task == "age" else gender for age, gender in (p for p in parsed if p is not None)],
                      dtype=np.float32 if task == "age" else np.int64)
    return {split: values[rows] for split, rows in split_rows(len(values), split_fractions, seed).items()}


def load_utkface(folder: Path, *, seed: int = 0, split_fractions: Sequence[float] = (0.6, 0.2, 0.2),
                 image_size: int = UTKFACE_SIZE) -> FaceData:
    """UTKFace as :class:`FaceData` "utkface": RGB uint8 [N, S, S, 3], gender and age from the names.

    S = ``image_size``, at most the native 200: a smaller S shrinks the faces once, here, instead of
    on every training batch. Images not 200×200 are first resized to 200×200 and counted; other modes are converted to RGB;
    unreadable images are dropped and counted. Expression is -1 throughout. Metadata records the
    split seed and fractions, and the counts of malformed names, resized and unreadable images.
    """
    folder = Path(folder)
    if not 8 <= image_size <= UTKFACE_SIZE:
        raise ValueError(f"UTKFace image_size must lie in [8, {UTKFACE_SIZE}] (never above the native size), "
                         f"got {image_size}")
    if not folder.is_dir():
        raise FileNotFoundError(f"UTKFace folder {folder} not found; point it at the folder holding the *.jpg files")
    names = sorted(entry.name for entry in folder.iterdir() if entry.is_file())
    jpgs = [name for name in names if name.lower().endswith(".jpg")]
    parsed = {name: parse_utkface_name(name) for name in jpgs}
    valid = [name for name in jpgs if parsed[name] is not None]
    malformed = [name for name in jpgs if parsed[name] is None]
    if malformed:
        warnings.warn(f"UTKFace {folder}: skipped {len(malformed)} file(s) with malformed names, e.g. "
                      f"{malformed[:3]} (expected age_gender_race_datetime.jpg)", stacklevel=2)
    if not valid:
        raise ValueError(f"UTKFace {folder}: no file named age_gender_race_datetime.jpg[.chip.jpg] "
                         f"among {len(names)} files")

    rows = split_rows(len(valid), split_fractions, seed)
    # Decode in split order into one array; each split is then a slice of it (a view, not a copy).
    order = np.concatenate([rows[name] for name in SPLIT_NAMES])
    ordered = [valid[index] for index in order]
    images, result = decode_faces([folder / name for name in ordered], UTKFACE_SIZE, desc="decoding UTKFace",
                                  store_size=image_size)
    if result.failures:
        warnings.warn(f"UTKFace {folder}: {len(result.failures)} unreadable image(s) left out, e.g. "
                      f"{list(result.failures[:3])}", stacklevel=2)
    if result.num_resized:
        warnings.warn(f"UTKFace {folder}: {result.num_resized} image(s) were not 200x200 and were resized",
                      stacklevel=2)
    ages = np.array([parsed[name][0] for name in ordered], dtype=np.float32)
    genders = np.array([parsed[name][1] for name in ordered], dtype=np.int64)

    splits, start = {}, 0
    for split_name in SPLIT_NAMES:
        stop = start + len(rows[split_name])
        ok = result.ok[start:stop]
        part = slice(start, stop)
        start = stop
        count = int(ok.sum())
        splits[split_name] = FaceSplit(
            images=images[part] if ok.all() else images[part][ok],
            expression=np.full(count, -1, dtype=np.int64),
            gender=genders[part][ok],
            age=ages[part][ok],
        )
    kept_genders = np.concatenate([split.gender for split in splits.values()])
    metadata = {
        "source": "UTKFace aligned & cropped faces; labels from file names",
        "seed": str(seed),
        "image_size": str(image_size),
        "split_fractions": json.dumps(list(split_fractions)),
        "num_files": str(len(names)),
        "ignored_non_jpg": str(len(names) - len(jpgs)),
        "malformed_names": str(len(malformed)),
        "malformed_examples": json.dumps(malformed[:10]),
        "resized_images": str(result.num_resized),
        "unreadable_images": str(len(result.failures)),
        "split_sizes": json.dumps({name: len(split) for name, split in splits.items()}),
        "gender_counts": json.dumps(np.bincount(kept_genders, minlength=2).tolist()),  # male, female
    }
    return FaceData(name="utkface", splits=splits, metadata=metadata)


__all__ = ["UTKFACE_SIZE", "load_utkface", "parse_utkface_name", "split_rows", "utkface_split_labels"]
