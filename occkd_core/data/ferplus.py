"""FER+ from its original files: FER2013's ``fer2013.csv`` (pixels) joined row by row with Microsoft's
``fer2013new.csv`` (10 crowd votes per image), spec §2.1.

Label rules (spec §15 #16 leaves the scheme open; the vote columns neutral..contempt are already in
:data:`~occkd_core.tasks.EXPRESSIONS` order):

* ``"majority"`` (default) is the "majority" mode of Microsoft's own FERPlus code
  (``FERPlusReader._process_target``): every column with a single vote is zeroed first (their outlier
  removal); an image is kept if the largest remaining count is more than half of the remaining total,
  taken over all 10 columns (unknown and NF included); the winner is its label, and images whose
  winner is unknown or NF are dropped. On the real files this keeps 25,057 / 3,199 / 3,152
  train / val / test images (25,060 / 3,199 / 3,153 before dropping the 4 duplicate names below); the
  papers report 25,045 / 3,191 / 3,137. A strict majority of the raw 10 votes would keep only
  21,811 / 2,862 / 2,729.
* ``"plurality"``: the column with the most raw votes wins if it beats every other column (the other
  emotions, unknown and NF) strictly; ties and unknown/NF winners are dropped
  (26,940 / 3,396 / 3,376 on the real files, minus the duplicates).

Rows are dropped, whatever the rule, when their ``Image name`` is empty (FER+ found no usable image),
or when the same name occurs again in a later row: FERPlus's ``generate_training_data.py`` writes one
PNG per name, so only the later row's pixels exist in FER+ under that name.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from occkd_core.data.store import FaceData, FaceSplit
from occkd_core.tasks import EXPRESSIONS

LabelRule = Literal["majority", "plurality"]
LABEL_RULES: tuple[LabelRule, ...] = ("majority", "plurality")
FER_HEADER = ("emotion", "pixels", "Usage")
VOTE_COLUMNS = (*EXPRESSIONS, "unknown", "NF")  # FER+'s column order; the first 8 are EXPRESSIONS
VOTES_HEADER = ("Usage", "Image name", *VOTE_COLUMNS)
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
FER_SIZE = 48
_NUM_PIXELS = FER_SIZE * FER_SIZE
_BLOCK_BYTES = 16 << 20  # CSV read in ~16 MB blocks: the split pixel strings of one block stay small

# Why a row gets no label; -1 is a label (unknown) in the store, so these are negative and distinct.
_NO_IMAGE_NAME, _DUPLICATE_NAME, _NO_WINNER, _UNKNOWN_OR_NF = -1, -2, -3, -4
_DROP_REASONS = {_NO_IMAGE_NAME: "no_image_name", _DUPLICATE_NAME: "duplicate_image_name",
                 _NO_WINNER: "no_winner", _UNKNOWN_OR_NF: "unknown_or_nf_winner"}


def _header(path: Path) -> tuple[str, ...]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as file:
            line = file.readline()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    return tuple(field.strip() for field in line.rstrip("\r\n").split(","))


def _check_header(path: Path, expected: tuple[str, ...]) -> None:
    found = _header(path)
    if found != expected:
        raise ValueError(f"{path} has header {','.join(found)!r}, expected {','.join(expected)!r}: "
                         "pass the original file (FER2013 challenge CSV / Microsoft FERPlus fer2013new.csv)")


def _open_csv(path: Path, columns: tuple[str, ...], types: dict[str, pa.DataType]) -> pcsv.CSVStreamingReader:
    # The header was checked by hand, so the reader skips it and names the columns itself.
    return pcsv.open_csv(
        pa.input_stream(str(path), compression="detect"),
        read_options=pcsv.ReadOptions(skip_rows=1, column_names=list(columns), block_size=_BLOCK_BYTES),
        convert_options=pcsv.ConvertOptions(column_types=types, strings_can_be_null=False),
    )


def _parse_pixels(pixels: pa.Array, first_row: int, path: Path) -> np.ndarray:
    """Space-separated grey levels of one block of rows -> uint8 [rows, 48, 48], all rows at once."""
    values = pc.ascii_split_whitespace(pixels)
    lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    short = np.flatnonzero(lengths != _NUM_PIXELS)
    if short.size:
        row = first_row + int(short[0])
        raise ValueError(f"{path}: row {row} (line {row + 2}) has {lengths[short[0]]} pixel values, expected "
                         f"{_NUM_PIXELS} (48x48); the file is truncated or damaged, get a fresh copy")
    flat = pc.list_flatten(values)
    # Digits only and at most 3 of them, so the uint16 cast cannot fail and > 255 is caught below.
    bad = pc.invert(pc.and_(pc.utf8_is_digit(flat), pc.less_equal(pc.utf8_length(flat), 3))).to_numpy(
        zero_copy_only=False)
    numbers = None if bad.any() else pc.cast(flat, pa.uint16()).to_numpy()
    if numbers is not None:
        bad = numbers > 255
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        row = first_row + first // _NUM_PIXELS
        raise ValueError(f"{path}: row {row} (line {row + 2}) has pixel value {flat[first].as_py()!r}, expected "
                         "integers 0..255 separated by spaces; the file is damaged, get a fresh copy")
    return numbers.astype(np.uint8).reshape(-1, FER_SIZE, FER_SIZE)


def read_fer2013(fer_csv: Path) -> tuple[np.ndarray, np.ndarray]:
    """Pixels uint8 [N, 48, 48] and Usage (str [N]) of ``fer2013.csv`` or ``.csv.gz``, parsed vectorised."""
    fer_csv = Path(fer_csv)
    _check_header(fer_csv, FER_HEADER)
    images, usages, num_rows = [], [], 0
    try:
        reader = _open_csv(fer_csv, FER_HEADER, {name: pa.string() for name in FER_HEADER})
        for batch in reader:
            images.append(_parse_pixels(batch.column("pixels"), num_rows, fer_csv))
            usages.append(batch.column("Usage").to_numpy(zero_copy_only=False))
            num_rows += batch.num_rows
    except (pa.ArrowInvalid, OSError, EOFError) as error:  # a bad row, or a truncated / damaged .gz
        raise ValueError(f"{fer_csv} is not a valid FER2013 CSV: {error}") from None
    if num_rows == 0:
        raise ValueError(f"{fer_csv} has a header but no rows; pass the full FER2013 CSV")
    return np.concatenate(images), np.concatenate(usages).astype(str)


def read_ferplus_votes(votes_csv: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Usage (str [N]), image names (str [N], '' when empty) and votes (int64 [N, 10]) of ``fer2013new.csv``."""
    votes_csv = Path(votes_csv)
    _check_header(votes_csv, VOTES_HEADER)
    types = {"Usage": pa.string(), "Image name": pa.string(), **{name: pa.int64() for name in VOTE_COLUMNS}}
    try:
        table = _open_csv(votes_csv, VOTES_HEADER, types).read_all()
    except pa.ArrowInvalid as error:
        raise ValueError(f"{votes_csv} is not a valid FER+ votes CSV (integer votes expected): {error}") from None
    votes = np.stack([table.column(name).to_numpy() for name in VOTE_COLUMNS], axis=1).astype(np.int64)
    if (votes < 0).any():
        row = int(np.flatnonzero((votes < 0).any(axis=1))[0])
        raise ValueError(f"{votes_csv}: row {row} (line {row + 2}) has a negative vote count {votes[row].tolist()}")
    usage = table.column("Usage").to_numpy(zero_copy_only=False).astype(str)
    names = np.char.strip(table.column("Image name").to_numpy(zero_copy_only=False).astype(str))
    return usage, names, votes


def ferplus_labels(votes: np.ndarray, rule: LabelRule = "majority") -> np.ndarray:
    """Label per row of ``votes`` (int [N, 10], FER+ column order) under ``rule``: 0..7, or a negative drop code.

    Drop codes: -3 no winner (no majority / a tie), -4 the winner is unknown or NF. See the module docstring.
    """
    if rule not in LABEL_RULES:
        raise ValueError(f"unknown FER+ label rule {rule!r}; valid rules: {', '.join(LABEL_RULES)}")
    votes = np.asarray(votes)
    if votes.ndim != 2 or votes.shape[1] != len(VOTE_COLUMNS):
        raise ValueError(f"votes must be [N, {len(VOTE_COLUMNS)}] ({', '.join(VOTE_COLUMNS)}), got {votes.shape}")
    if rule == "majority":
        counts = np.where(votes <= 1, 0, votes)  # FERPlus drops single votes as outliers
        top = counts.max(axis=1)
        has_winner = top > counts.sum(axis=1) / 2  # false when every count was zeroed (0 > 0)
    else:
        counts = votes
        top = counts.max(axis=1)
        has_winner = (counts == top[:, None]).sum(axis=1) == 1
    winner = counts.argmax(axis=1)
    return np.where(~has_winner, _NO_WINNER, np.where(winner >= len(EXPRESSIONS), _UNKNOWN_OR_NF, winner))


def _name_drops(names: np.ndarray) -> np.ndarray:
    """Drop code per row for its image name: empty, or reused by a later row (only the later PNG exists)."""
    codes = np.where(names == "", _NO_IMAGE_NAME, 0)
    last_row: dict[str, int] = {}
    for row, name in enumerate(names.tolist()):
        if name:
            last_row[name] = row
    for row, name in enumerate(names.tolist()):
        if name and last_row[name] != row:
            codes[row] = _DUPLICATE_NAME
    return codes


def load_ferplus(fer_csv: Path, votes_csv: Path, *, label_rule: LabelRule = "majority") -> FaceData:
    """FER+ as :class:`FaceData` "ferplus": splits train/val/test from Usage Training/PublicTest/PrivateTest.

    Images are uint8 [N, 48, 48, 1]; expression follows ``label_rule`` (module docstring); gender -1,
    age NaN. Metadata records the rule, split sizes, class counts and the rows dropped per reason.
    """
    fer_csv, votes_csv = Path(fer_csv), Path(votes_csv)
    if label_rule not in LABEL_RULES:
        raise ValueError(f"unknown FER+ label rule {label_rule!r}; valid rules: {', '.join(LABEL_RULES)}")
    vote_usage, names, votes = read_ferplus_votes(votes_csv)
    images, usage = read_fer2013(fer_csv)
    if len(vote_usage) != len(usage):
        raise ValueError(f"{votes_csv} has {len(vote_usage)} rows but {fer_csv} has {len(usage)}; they are joined "
                         "row by row, so pass the fer2013new.csv that belongs to this fer2013.csv")
    unknown = sorted(set(np.unique(usage).tolist()) - set(USAGE_TO_SPLIT))
    if unknown:
        raise ValueError(f"{fer_csv}: unknown Usage value(s) {unknown}; expected {', '.join(USAGE_TO_SPLIT)}")
    disagree = np.flatnonzero(vote_usage != usage)
    if disagree.size:
        row = int(disagree[0])
        raise ValueError(f"Usage disagrees in {disagree.size} row(s), first at row {row} (line {row + 2}): "
                         f"{fer_csv.name} says {usage[row]!r}, {votes_csv.name} says {vote_usage[row]!r}; "
                         "the files are not in the same row order, pass the matching pair")

    labels = _kept_labels(names, votes, label_rule)
    splits, dropped, class_counts = {}, {}, {}
    for usage_name, split_name in USAGE_TO_SPLIT.items():
        in_split = usage == usage_name
        keep = in_split & (labels >= 0)
        count = int(keep.sum())
        splits[split_name] = FaceSplit(
            images=images[keep][..., None],
            expression=labels[keep].astype(np.int64),
            gender=np.full(count, -1, dtype=np.int64),
            age=np.full(count, np.nan, dtype=np.float32),
        )
        dropped[split_name] = {reason: int((in_split & (labels == code)).sum())
                               for code, reason in _DROP_REASONS.items()}
        class_counts[split_name] = np.bincount(labels[keep], minlength=len(EXPRESSIONS)).tolist()
    metadata = {
        "source": "FER2013 pixels + Microsoft FERPlus votes",
        "label_rule": label_rule,
        "num_rows": str(len(usage)),
        "split_sizes": json.dumps({name: len(split) for name, split in splits.items()}),
        "dropped": json.dumps(dropped),
        "class_counts": json.dumps(class_counts),  # per split, in EXPRESSIONS order
    }
    return FaceData(name="ferplus", splits=splits, metadata=metadata)


def _kept_labels(names: np.ndarray, votes: np.ndarray, label_rule: LabelRule) -> np.ndarray:
    """Per row, its expression class, or a negative drop code (see _DROP_REASONS)."""
    name_codes = _name_drops(names)
    return np.where(name_codes < 0, name_codes, ferplus_labels(votes, label_rule))


def ferplus_split_labels(votes_csv: Path, *, label_rule: LabelRule = "majority") -> dict[str, np.ndarray]:
    """Per split, the expression labels :func:`load_ferplus` keeps, from the votes file alone (no pixels)."""
    usage, names, votes = read_ferplus_votes(Path(votes_csv))
    labels = _kept_labels(names, votes, label_rule)
    return {split: labels[(usage == usage_name) & (labels >= 0)] for usage_name, split in USAGE_TO_SPLIT.items()}


__all__ = [
    "FER_HEADER",
    "LABEL_RULES",
    "VOTES_HEADER",
    "LabelRule",
    "ferplus_labels",
    "ferplus_split_labels",
    "load_ferplus",
    "read_fer2013",
    "read_ferplus_votes",
]
