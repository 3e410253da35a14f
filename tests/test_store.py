"""The Arrow face store: round trip, zero-copy opening, label checks, and errors a user can act on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from occkd_core.data import FaceData, FaceSplit, open_face_store, validate_face_data, write_face_store
from occkd_core.data import store


def _split(num_rows: int, channels: int = 3, seed: int = 0) -> FaceSplit:
    rng = np.random.default_rng(seed)
    return FaceSplit(
        images=rng.integers(0, 256, (num_rows, 6, 5, channels), dtype=np.uint8),
        expression=rng.integers(0, 8, num_rows).astype(np.int64),
        gender=rng.integers(0, 2, num_rows).astype(np.int64),
        age=rng.integers(1, 91, num_rows).astype(np.float32),
    )


def _data(channels: int = 3) -> FaceData:
    splits = {"train": _split(7, channels, 1), "val": _split(3, channels, 2), "test": _split(4, channels, 3),
              "test_affectnet": _split(2, channels, 4)}
    return FaceData(name="tiny", splits=splits, metadata={"seed": "7", "source": "unit test"})


def _with(split: FaceSplit, **columns: np.ndarray) -> FaceSplit:
    values = {name: getattr(split, name) for name in ("images", "expression", "gender", "age")}
    return FaceSplit(**{**values, **columns})


@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_is_exact_and_images_are_zero_copy_views(tmp_path: Path, channels: int) -> None:
    data = _data(channels)
    path = write_face_store(tmp_path / "faces.arrow", data)
    opened = open_face_store(path)
    assert opened.name == "tiny" and dict(opened.metadata) == {"seed": "7", "source": "unit test"}
    assert list(opened.splits) == ["train", "val", "test", "test_affectnet"]  # order kept
    for name, split in data.splits.items():
        got = opened.split(name)
        for column in ("images", "expression", "gender", "age"):
            np.testing.assert_array_equal(getattr(got, column), getattr(split, column))
            assert getattr(got, column).dtype == getattr(split, column).dtype
        # A view of the memory-mapped file: it owns no memory, cannot be written, and is one
        # contiguous block per split.
        assert got.images.base is not None and not got.images.flags.owndata
        assert not got.images.flags.writeable
        assert got.images.flags.c_contiguous
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed into place


def test_store_keeps_one_record_batch_per_split_with_row_ranges(tmp_path: Path) -> None:
    path = write_face_store(tmp_path / "faces.arrow", _data())
    reader = pa.ipc.open_file(pa.memory_map(str(path)))
    # Splits of 7, 3, 4 and 2 rows, stored in that order: ranges 0-7, 7-10, 10-14, 14-16.
    assert [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)] == [7, 3, 4, 2]
    assert reader.schema.metadata[b"occkd.splits"] == b'{"train": [0, 7], "val": [7, 10], "test": [10, 14], "test_affectnet": [14, 16]}'
    assert reader.schema.field("image").type == pa.binary(6 * 5 * 3)


def test_labels_refuse_unknown_and_out_of_range_values() -> None:
    split = _split(5)
    np.testing.assert_array_equal(split.labels("fer"), split.expression)
    np.testing.assert_array_equal(split.labels("age"), split.age)
    expression = split.expression.copy()
    expression[[1, 3]] = -1
    with pytest.raises(ValueError, match=r"task 'fer': 2 of 5 .* first at index 1"):
        _with(split, expression=expression).labels("fer")
    gender = split.gender.copy()
    gender[4] = 2
    with pytest.raises(ValueError, match=r"task 'gender': 1 of 5 .* first at index 4"):
        _with(split, gender=gender).labels("gender")
    age = split.age.copy()
    age[2] = np.nan
    with pytest.raises(ValueError, match=r"task 'age': 1 of 5 .* first at index 2"):
        _with(split, age=age).labels("age")
    with pytest.raises(ValueError, match="valid names: age, fer, gender"):
        split.labels("emotion")


def test_take_copies_the_chosen_rows() -> None:
    split = _split(6)
    subset = split.take(np.array([4, 0]))
    assert len(subset) == 2
    np.testing.assert_array_equal(subset.images, split.images[[4, 0]])
    np.testing.assert_array_equal(subset.age, split.age[[4, 0]])
    assert not np.shares_memory(subset.images, split.images)
    with pytest.raises(ValueError, match="integer array"):
        split.take(np.array([0.5]))


@pytest.mark.parametrize(
    "column, bad_value, message",
    [
        ("expression", 8, r"split 'val', column 'expression': 1 value\(s\) outside -1..7, first at index 2"),
        ("expression", -2, r"column 'expression'"),
        ("gender", 2, r"split 'val', column 'gender': 1 value\(s\) outside -1..1, first at index 2"),
        ("age", -1.0, r"split 'val', column 'age'.* first at index 2"),
        ("age", 131.0, r"column 'age'"),
        ("age", np.inf, r"column 'age'"),
    ],
)
def test_validate_names_split_column_count_and_first_bad_index(column: str, bad_value: float, message: str) -> None:
    data = _data()
    values = getattr(data.split("val"), column).copy()
    values[2] = bad_value
    splits = {**data.splits, "val": _with(data.split("val"), **{column: values})}
    with pytest.raises(ValueError, match=message):
        validate_face_data(FaceData(data.name, splits, data.metadata))


def test_validate_accepts_unknowns() -> None:
    data = _data()
    split = data.split("train")
    unknown = _with(split, expression=np.full(7, -1), gender=np.full(7, -1), age=np.full(7, np.nan, dtype=np.float32))
    validate_face_data(FaceData(data.name, {**data.splits, "train": unknown}, data.metadata))


def test_structure_errors() -> None:
    split = _split(3)
    with pytest.raises(ValueError, match="int64"):
        _with(split, expression=split.expression.astype(np.int32))
    with pytest.raises(ValueError, match="age has 2 rows but images has 3"):
        _with(split, age=split.age[:2])
    with pytest.raises(ValueError, match="uint8"):
        _with(split, images=split.images.astype(np.float32))
    with pytest.raises(ValueError, match="channels"):
        _with(split, images=np.zeros((3, 4, 4, 2), np.uint8))
    data = _data()
    with pytest.raises(ValueError, match=r"lacks split\(s\) \['val'\]"):
        validate_face_data(FaceData("x", {"train": split, "test": split}, {}))
    with pytest.raises(ValueError, match="metadata must map str to str"):
        validate_face_data(FaceData("x", data.splits, {"seed": 7}))  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="available splits: train, val, test, test_affectnet"):
        data.split("validation")


def test_write_refuses_mixed_image_shapes(tmp_path: Path) -> None:
    data = _data()
    bigger = _with(data.split("test"), images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"share \(H, W, C\)"):
        write_face_store(tmp_path / "faces.arrow", FaceData("x", {**data.splits, "test": bigger}, {}))


def test_failed_write_leaves_the_old_store_and_no_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_face_store(tmp_path / "faces.arrow", _data())
    before = path.read_bytes()

    def broken(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store, "_record_batch", broken)
    with pytest.raises(OSError, match="disk full"):
        write_face_store(path, FaceData("other", _data().splits, {}))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["faces.arrow"]


def test_open_errors_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="no face store at .*missing.arrow"):
        open_face_store(tmp_path / "missing.arrow")

    text = tmp_path / "notes.arrow"
    text.write_text("not arrow")
    with pytest.raises(ValueError, match="not an Arrow IPC file"):
        open_face_store(text)

    plain = tmp_path / "plain.arrow"
    table = pa.table({"x": [1, 2]})
    with pa.OSFile(str(plain), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(ValueError, match="not an occkd face store"):
        open_face_store(plain)

    monkeypatch.setattr(store, "SCHEMA_VERSION", "0")
    old = write_face_store(tmp_path / "old.arrow", _data())
    monkeypatch.setattr(store, "SCHEMA_VERSION", "1")
    with pytest.raises(ValueError, match="schema version 0, this code reads version 1"):
        open_face_store(old)


def test_a_failed_atomic_write_names_the_file_it_meant(tmp_path):
    from occkd_core.files import atomic_write_bytes

    (tmp_path / "best.pt").mkdir()  # the target cannot be replaced
    with pytest.raises(IsADirectoryError, match=str(tmp_path / "best.pt")):
        atomic_write_bytes(tmp_path / "best.pt", b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temporary left behind
