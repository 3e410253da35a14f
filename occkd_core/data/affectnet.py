"""AffectNet (manually annotated part) from its original file lists and images, spec §2.2.

Layout under ``root``: ``Manually_Annotated_file_lists/training.csv`` and ``validation.csv`` (header
``subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal``;
some copies of ``validation.csv`` lack the header line, which is accepted), and the images under
``Manually_Annotated_Images/<subDirectory_filePath>``.

:func:`load_affectnet` returns a :class:`FaceData` with two splits only, ``train`` and ``test``:
AffectNet has no validation split of its own (its official validation set is the test set, and
hyperparameters are tuned on FER+ validation), so it is not a complete store by itself;
:func:`occkd_core.data.sources.prepare_real_data` joins it with FER+.

Order of the steps, which decides the counts: rows with codes 8-10 (None, Uncertain, Non-Face) are
dropped; rows whose image file is missing are dropped and counted; the training classes are then
capped at ``cap_per_class`` by a seeded random choice among the files that exist (Mollahosseini et
al.: 287,651 -> 88,021 on the full data); the chosen images are decoded, and the few that cannot
be decoded (or whose face box lies outside the image) are dropped and counted, so a capped class
can end a little under the cap.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from occkd_core.data.decode import Box, decode_faces
from occkd_core.data.store import FaceData, FaceSplit
from occkd_core.tasks import EXPRESSIONS

LIST_DIR = "Manually_Annotated_file_lists"
IMAGE_DIR = "Manually_Annotated_Images"
LIST_FILES = {"train": "training.csv", "test": "validation.csv"}  # the official validation set is our test set
AFFECTNET_HEADER = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                    "facial_landmarks", "expression", "valence", "arousal")
AFFECTNET_NAMES = ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt",
                   "None", "Uncertain", "Non-Face")  # index = AffectNet expression code
#: AffectNet code -> index into EXPRESSIONS (FER+ order); codes 8-10 have no FER+ class and are dropped.
AFFECTNET_TO_EXPRESSION: dict[int, int] = {
    code: EXPRESSIONS.index(name) for code, name in enumerate(
        ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt"))
}
_USED_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression")


def _has_header(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8-sig", newline="") as file:
            first = next(csv.reader(file), [])
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read AffectNet list {path}: {error}") from None
    fields = tuple(field.strip() for field in first)
    if fields == AFFECTNET_HEADER:
        return True
    # A header-less copy: 9 fields whose 7th is an expression code.
    if len(fields) == len(AFFECTNET_HEADER) and fields[6].lstrip("-").isdigit():
        return False
    raise ValueError(f"{path} starts with {','.join(fields)[:200]!r}; expected the header "
                     f"{','.join(AFFECTNET_HEADER)!r} (or a header-less AffectNet list with 9 columns)")


def read_affectnet_list(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Relative image paths, face boxes (int64 [N, 4]: x, y, width, height) and codes (int64 [N]) of one list."""
    path = Path(path)
    skip = 1 if _has_header(path) else 0
    types = {name: pa.float64() for name in ("face_x", "face_y", "face_width", "face_height")}
    try:
        table = pcsv.read_csv(
            path,
            read_options=pcsv.ReadOptions(skip_rows=skip, column_names=list(AFFECTNET_HEADER)),
            convert_options=pcsv.ConvertOptions(
                include_columns=list(_USED_COLUMNS),
                column_types={**types, "subDirectory_filePath": pa.string(), "expression": pa.int64()}),
        )
    except pa.ArrowInvalid as error:
        raise ValueError(f"{path} is not a valid AffectNet list (numeric box and expression expected): "
                         f"{error}") from None
    codes = table.column("expression").to_numpy().astype(np.int64)
    bad = np.flatnonzero((codes < 0) | (codes >= len(AFFECTNET_NAMES)))
    if bad.size:
        row = int(bad[0])
        raise ValueError(f"{path}: row {row} has expression code {codes[row]}, expected 0..{len(AFFECTNET_NAMES) - 1}")
    boxes = np.stack([table.column(name).to_numpy() for name in types], axis=1)
    if not np.isfinite(boxes).all():
        row = int(np.flatnonzero(~np.isfinite(boxes).all(axis=1))[0])
        raise ValueError(f"{path}: row {row} has an empty or non-finite face box {boxes[row].tolist()}")
    paths = [name.strip() for name in table.column("subDirectory_filePath").to_pylist()]
    return paths, np.floor(boxes).astype(np.int64), codes


def cap_classes(labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Sorted row indices keeping at most ``cap`` rows of each label, chosen by a seeded random draw (spec §2.2)."""
    if cap < 1:
        raise ValueError(f"cap per class must be >= 1, got {cap}")
    rng = np.random.default_rng(seed)
    kept = []
    for label in np.unique(labels):  # fixed order, so the draw depends only on seed and labels
        rows = np.flatnonzero(labels == label)
        kept.append(rng.choice(rows, size=cap, replace=False) if len(rows) > cap else rows)
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)


def _counts(codes: np.ndarray) -> dict[str, int]:
    return {AFFECTNET_NAMES[code]: int((codes == code).sum()) for code in range(len(AFFECTNET_NAMES))}


def load_affectnet(root: Path, *, image_size: int = 96, cap_per_class: int = 15000, seed: int = 0,
                   allocate: Callable[[tuple[int, ...]], np.ndarray] | None = None) -> FaceData:
    """AffectNet as :class:`FaceData` "affectnet" with splits ``train`` (capped) and ``test`` (official validation).

    Each face box is cropped (clipped to the image), converted to RGB and resized to
    ``image_size`` × ``image_size``: images uint8 [N, S, S, 3]; expression in EXPRESSIONS order; gender
    -1, age NaN. Missing and unreadable images are counted in the metadata and warned about; the call
    fails only if nothing is left.

    ``allocate(shape)``: where the decoded images go, one uint8 array for train then test (default: a
    new array in RAM). At 224 px the capped training set alone is ~14 GB, so the grid passes a
    memory-mapped file. Each split is a contiguous slice of it; unreadable rows are squeezed out in place.
    """
    root = Path(root)
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    wanted: dict[str, tuple[list[Path], np.ndarray, np.ndarray]] = {}
    stats: dict[str, dict] = {}
    for split_name, file_name in LIST_FILES.items():
        list_path = root / LIST_DIR / file_name
        if not list_path.is_file():
            raise FileNotFoundError(f"AffectNet list {list_path} not found; "
                                    f"expected {LIST_DIR}/{file_name} under {root}")
        rel_paths, boxes, codes = read_affectnet_list(list_path)
        usable = np.flatnonzero(codes < len(AFFECTNET_TO_EXPRESSION))
        paths = [root / IMAGE_DIR / rel_paths[row] for row in usable]
        exists = np.array([path.is_file() for path in paths], dtype=bool)
        missing = [str(path) for path, ok in zip(paths, exists) if not ok]
        rows = usable[exists]
        if split_name == "train":
            rows = rows[cap_classes(codes[rows], cap_per_class, seed)]
        wanted[split_name] = ([root / IMAGE_DIR / rel_paths[row] for row in rows], boxes[rows], codes[rows])
        stats[split_name] = {"rows": len(codes), "codes_in_list": _counts(codes),
                             "dropped_codes_8_to_10": int(len(codes) - len(usable)),
                             "missing_images": len(missing), "missing_examples": missing[:5]}

    # One decode pass over both splits, into one array whose slices become the splits (no copies).
    all_paths = wanted["train"][0] + wanted["test"][0]
    all_boxes: list[Box] = [tuple(box) for box in np.concatenate([wanted["train"][1], wanted["test"][1]]).tolist()]
    shape = (len(all_paths), image_size, image_size, 3)
    images, result = decode_faces(all_paths, image_size, all_boxes, desc="decoding AffectNet",
                                  out=allocate(shape) if allocate else None)
    splits, start = {}, 0
    for split_name, (paths, _, codes) in wanted.items():
        ok = result.ok[start:start + len(paths)]
        split_images = _squeeze_out(images[start:start + len(paths)], ok)
        start += len(paths)
        labels = np.array([AFFECTNET_TO_EXPRESSION[code] for code in codes.tolist()], dtype=np.int64)[ok]
        splits[split_name] = FaceSplit(
            images=split_images,
            expression=labels,
            gender=np.full(len(labels), -1, dtype=np.int64),
            age=np.full(len(labels), np.nan, dtype=np.float32),
        )
        stats[split_name]["unreadable_images"] = int((~ok).sum())
        stats[split_name]["size"] = len(labels)
        stats[split_name]["class_counts"] = np.bincount(labels, minlength=len(EXPRESSIONS)).tolist()

    num_missing = sum(stat["missing_images"] for stat in stats.values())
    if num_missing or result.failures:
        examples = [path for stat in stats.values() for path in stat["missing_examples"]][:3]
        warnings.warn(f"AffectNet under {root}: {num_missing} image file(s) missing (e.g. {examples}) and "
                      f"{len(result.failures)} unreadable (e.g. {list(result.failures[:3])}); they were left out",
                      stacklevel=2)
    empty = [name for name, split in splits.items() if len(split) == 0]
    if empty:
        raise ValueError(f"AffectNet under {root}: no usable image left in split(s) {empty} "
                         f"({json.dumps(stats)}); check that {IMAGE_DIR}/ holds the images the lists name")
    metadata = {
        "source": "AffectNet manually annotated (official validation set as test)",
        "image_size": str(image_size), "cap_per_class": str(cap_per_class), "seed": str(seed),
        "stats": json.dumps(stats),
        "unreadable_examples": json.dumps(list(result.failures[:5])),
    }
    return FaceData(name="affectnet", splits=splits, metadata=metadata)


def _squeeze_out(images: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``images[keep]`` without a copy of the whole array: kept rows move up in place, in order, and the
    result is a leading slice (``images[keep]`` would need a second array the size of the first)."""
    if keep.all():
        return images
    kept = np.flatnonzero(keep)
    for target, source in enumerate(kept):
        if target != source:
            images[target] = images[source]
    return images[:len(kept)]


__all__ = ["AFFECTNET_HEADER", "AFFECTNET_NAMES", "AFFECTNET_TO_EXPRESSION", "cap_classes", "load_affectnet",
           "read_affectnet_list"]
