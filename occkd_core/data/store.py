"""Prepared face data: labelled image splits, stored as one memory-mappable Arrow IPC file.

Every source (synthetic faces, FER+, AffectNet, UTKFace) is turned once into a :class:`FaceData` and
written with :func:`write_face_store`. Training workers open it with :func:`open_face_store`, which
maps the file instead of reading it: the images of a split become a read-only numpy view of the page
cache, so several workers on one node share a single copy and opening costs O(1) whatever the size.

Layout (schema version 1): columns ``image`` (FixedSizeBinary of H·W·C bytes), ``expression`` (int64),
``gender`` (int64), ``age`` (float32); one record batch per split, in the order of
``occkd.splits`` in the schema metadata, which also holds the image shape, the data's name, its
free-form metadata and each split's row range.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa

from occkd_core.files import atomic_write
from occkd_core.tasks import EXPRESSIONS, get_task

SCHEMA_VERSION = "1"
MAX_AGE = 130.0
REQUIRED_SPLITS = ("train", "val", "test")
NUM_GENDERS = 2

_META_PREFIX = "occkd."
_LABEL_DTYPES: dict[str, np.dtype] = {
    "expression": np.dtype(np.int64),
    "gender": np.dtype(np.int64),
    "age": np.dtype(np.float32),
}


@dataclass(frozen=True, eq=False)  # eq=False: `==` on numpy fields would be ambiguous
class FaceSplit:
    """Images and labels of one split; unknown labels are -1 (classes) or NaN (age)."""

    images: np.ndarray  # uint8 [N, H, W, C], C in {1, 3}; read-only view of the mapped file when opened
    expression: np.ndarray  # int64 [N], index into tasks.EXPRESSIONS (FER+ order), -1 = unknown
    gender: np.ndarray  # int64 [N], 0 male / 1 female, -1 = unknown
    age: np.ndarray  # float32 [N], years, NaN = unknown

    def __post_init__(self) -> None:
        # Structure only (O(1)); label values are checked by validate_face_data (O(N)).
        images = self.images
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            got = f"{images.dtype} array of shape {images.shape}" if isinstance(images, np.ndarray) else type(images)
            raise ValueError(f"images must be a uint8 array [N, H, W, C], got {got}")
        if images.shape[3] not in (1, 3):
            raise ValueError(f"images must have 1 (grey) or 3 (RGB) channels, got shape {images.shape}")
        for column, dtype in _LABEL_DTYPES.items():
            values = getattr(self, column)
            if not isinstance(values, np.ndarray) or values.dtype != dtype or values.ndim != 1:
                got = f"{values.dtype} array of shape {values.shape}" if isinstance(values, np.ndarray) else type(values)
                raise ValueError(f"{column} must be a 1-D {dtype} array, got {got}; convert with .astype(np.{dtype})")
            if len(values) != len(images):
                raise ValueError(f"{column} has {len(values)} rows but images has {len(images)}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def labels(self, task: str) -> np.ndarray:
        """The targets of ``task`` ([N] int64 classes or float32 years); raises if any is unknown or out of range."""
        info = get_task(task)
        values = getattr(self, info.label_column)
        if info.is_classification:
            bad = (values < 0) | (values >= info.num_outputs)
            what = f"labels outside 0..{info.num_outputs - 1} (-1 = unknown)"
        else:
            bad = ~np.isfinite(values) | (values < 0) | (values > MAX_AGE)
            what = f"ages that are unknown (NaN) or outside 0..{MAX_AGE:g}"
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"task {task!r}: {int(bad.sum())} of {len(values)} {what} in column {info.label_column!r}, "
                f"first at index {first} (value {values[first]}); drop those rows with take() first"
            )
        return values

    def take(self, indices: np.ndarray) -> FaceSplit:
        """A new split holding the rows ``indices`` (int array), copied."""
        indices = np.asarray(indices)
        if indices.dtype.kind not in "iu":
            raise ValueError(f"indices must be an integer array, got dtype {indices.dtype}")
        return FaceSplit(
            images=self.images[indices],
            expression=self.expression[indices],
            gender=self.gender[indices],
            age=self.age[indices],
        )


@dataclass(frozen=True, eq=False)
class FaceData:
    """A named data set: its splits (at least train/val/test) and free-form provenance."""

    name: str  # e.g. "synthetic", "ferplus", "utkface"
    splits: Mapping[str, FaceSplit]  # extra test sets allowed, e.g. "test_affectnet"
    metadata: Mapping[str, str]  # generator seed, source checksums...

    def split(self, name: str) -> FaceSplit:
        try:
            return self.splits[name]
        except KeyError:
            raise ValueError(
                f"data {self.name!r} has no split {name!r}; available splits: {', '.join(self.splits)}"
            ) from None


def validate_face_data(data: FaceData) -> None:
    """Raise ValueError on missing splits, non-string metadata or label values out of range.

    Unknown labels (-1, NaN age) are allowed here; :meth:`FaceSplit.labels` refuses them per task.
    """
    missing = [name for name in REQUIRED_SPLITS if name not in data.splits]
    if missing:
        raise ValueError(f"data {data.name!r} lacks split(s) {missing}; it has {list(data.splits)}")
    for key, value in data.metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata must map str to str, got {key!r}: {value!r} (json.dumps the value)")
    for split_name, split in data.splits.items():
        if not isinstance(split, FaceSplit):
            raise ValueError(f"split {split_name!r} must be a FaceSplit, got {type(split).__name__}")
        checks = {
            "expression": (split.expression < -1) | (split.expression >= len(EXPRESSIONS)),
            "gender": (split.gender < -1) | (split.gender >= NUM_GENDERS),
            # NaN means unknown; anything else must be a finite age in range.
            "age": np.isinf(split.age) | (split.age < 0) | (split.age > MAX_AGE),
        }
        allowed = {"expression": f"-1..{len(EXPRESSIONS) - 1}", "gender": "-1..1", "age": f"0..{MAX_AGE:g} or NaN"}
        for column, bad in checks.items():
            if bad.any():
                first = int(np.flatnonzero(bad)[0])
                value = getattr(split, column)[first]
                raise ValueError(
                    f"split {split_name!r}, column {column!r}: {int(bad.sum())} value(s) outside "
                    f"{allowed[column]}, first at index {first} (value {value})"
                )


def _schema(image_shape: tuple[int, int, int], data: FaceData, ranges: dict[str, list[int]]) -> pa.Schema:
    height, width, channels = image_shape
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "name": data.name,
        "metadata": json.dumps(dict(data.metadata), sort_keys=True),
        "image_shape": json.dumps([height, width, channels]),
        "splits": json.dumps(ranges),  # insertion-ordered: split i is record batch i
    }
    return pa.schema(
        [
            pa.field("image", pa.binary(height * width * channels), nullable=False),
            pa.field("expression", pa.int64(), nullable=False),
            pa.field("gender", pa.int64(), nullable=False),
            pa.field("age", pa.float32(), nullable=False),
        ],
        metadata={_META_PREFIX + key: value for key, value in metadata.items()},
    )


def _record_batch(split: FaceSplit, schema: pa.Schema) -> pa.RecordBatch:
    # One contiguous buffer of N·H·W·C bytes: zero-copy from numpy into Arrow, and back on opening.
    pixels = np.ascontiguousarray(split.images)
    images = pa.FixedSizeBinaryArray.from_buffers(
        schema.field("image").type, len(split), [None, pa.py_buffer(pixels.reshape(-1))]
    )
    columns = [images] + [pa.array(getattr(split, name)) for name in _LABEL_DTYPES]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


def write_face_store(path: Path, data: FaceData) -> Path:
    """Validate ``data`` and write it to ``path`` atomically (:func:`occkd_core.files.atomic_write`); return ``path``."""
    path = Path(path)
    validate_face_data(data)
    shapes = {name: split.image_shape for name, split in data.splits.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"all splits of one store must share (H, W, C); got {shapes}: resize them when preparing")
    image_shape = next(iter(shapes.values()))

    ranges, start = {}, 0
    for name, split in data.splits.items():
        ranges[name] = [start, start + len(split)]
        start += len(split)
    schema = _schema(image_shape, data, ranges)

    with atomic_write(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for split in data.splits.values():
            writer.write_batch(_record_batch(split, schema))
    return path


def _split_from_batch(batch: pa.RecordBatch, image_shape: tuple[int, int, int]) -> FaceSplit:
    num_rows = batch.num_rows
    image_bytes = int(np.prod(image_shape))
    images = batch.column("image")
    # buffers() = [validity, data]; the data buffer is a slice of the memory map, so frombuffer is a view.
    pixels = np.frombuffer(images.buffers()[1], dtype=np.uint8, count=num_rows * image_bytes,
                           offset=images.offset * image_bytes)
    return FaceSplit(
        images=pixels.reshape(num_rows, *image_shape),
        **{name: batch.column(name).to_numpy(zero_copy_only=True) for name in _LABEL_DTYPES},
    )


def open_face_store(path: Path) -> FaceData:
    """Memory-map a store written by :func:`write_face_store`; images are read-only views, not copies."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no face store at {path}; prepare the data first (it writes this file)")
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    except pa.ArrowInvalid as error:
        raise ValueError(f"{path} is not an Arrow IPC file, so not an occkd face store ({error})") from None
    meta = {key.decode(): value.decode() for key, value in (reader.schema.metadata or {}).items()}
    version = meta.get(_META_PREFIX + "schema_version")
    if version is None:
        raise ValueError(f"{path} is an Arrow file but not an occkd face store (no occkd.* schema metadata)")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{path} has face-store schema version {version}, this code reads version {SCHEMA_VERSION}; "
            "prepare the data again with this version"
        )
    image_shape = tuple(json.loads(meta[_META_PREFIX + "image_shape"]))
    ranges: dict[str, list[int]] = json.loads(meta[_META_PREFIX + "splits"])
    if reader.num_record_batches != len(ranges):
        raise ValueError(f"{path} holds {reader.num_record_batches} record batches for {len(ranges)} splits; "
                         "the file is damaged, prepare the data again")
    splits = {}
    for index, (name, (start, stop)) in enumerate(ranges.items()):
        batch = reader.get_batch(index)
        if batch.num_rows != stop - start:
            raise ValueError(f"{path}: split {name!r} should have {stop - start} rows, its batch has "
                             f"{batch.num_rows}; the file is damaged, prepare the data again")
        splits[name] = _split_from_batch(batch, image_shape)  # type: ignore[arg-type]
    return FaceData(
        name=meta[_META_PREFIX + "name"],
        splits=splits,
        metadata=json.loads(meta[_META_PREFIX + "metadata"]),
    )


def store_summary(path: Path) -> tuple[str, dict[str, int]]:
    """A store's data set name and its splits' sizes, from the file's schema alone (no image is read)."""
    try:
        schema = pa.ipc.open_file(pa.memory_map(str(path), "r")).schema
        meta = {key.decode(): value.decode() for key, value in (schema.metadata or {}).items()}
        ranges = json.loads(meta[_META_PREFIX + "splits"])
        return meta[_META_PREFIX + "name"], {name: stop - start for name, (start, stop) in ranges.items()}
    except (OSError, pa.ArrowInvalid, KeyError, ValueError) as error:
        raise ValueError(f"{path} is not a readable occkd face store ({error})") from None


__all__ = [
    "FaceData", "FaceSplit", "MAX_AGE", "SCHEMA_VERSION",
    "open_face_store", "store_summary", "validate_face_data", "write_face_store",
]
