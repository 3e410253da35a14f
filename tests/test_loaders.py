"""Real-data loaders on tiny fixtures written here in the datasets' original formats: FER2013 + FER+ CSVs,
AffectNet file lists and images, UTKFace file names; and the cached conversion into stores."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from occkd_core.data import open_face_store
from occkd_core.data import sources as sources_module
from occkd_core.data.affectnet import AFFECTNET_HEADER, cap_classes, load_affectnet
from occkd_core.data.ferplus import FER_HEADER, VOTES_HEADER, ferplus_labels, load_ferplus
from occkd_core.data.sources import find_sources, prepare_real_data
from occkd_core.data.utkface import load_utkface, parse_utkface_name, split_rows

# ------------------------------------------------------------------------------------------ FER+ fixture

# (Usage, Image name, votes: neutral happiness surprise sadness anger disgust fear contempt unknown NF)
FER_ROWS = [
    ("Training", "fer0000000.png", [6, 0, 1, 1, 0, 0, 0, 0, 2, 0]),  # 0: single votes zeroed -> 6 of 8 > 4: neutral
    ("Training", "fer0000001.png", [4, 0, 0, 1, 3, 2, 0, 0, 0, 0]),  # 1: 4 of 9 is no majority; plurality neutral
    ("Training", "fer0000002.png", [0, 0, 0, 0, 0, 0, 0, 0, 0, 10]),  # 2: NF wins: dropped
    ("Training", "fer0000003.png", [1, 0, 0, 0, 0, 0, 0, 0, 7, 2]),  # 3: unknown wins (7 of 9): dropped
    ("Training", "fer0000004.png", [0, 3, 3, 0, 0, 0, 0, 1, 2, 1]),  # 4: 3 of 8, and a tie: dropped by both
    ("Training", "fer0000005.png", [0, 0, 0, 0, 0, 0, 0, 8, 1, 1]),  # 5: contempt 8 of 8
    ("Training", "", [10, 0, 0, 0, 0, 0, 0, 0, 0, 0]),  # 6: no image name: dropped
    ("Training", "fer0000007.png", [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]),  # 7: all single votes: nothing left / tie
    ("PublicTest", "fer0000008.png", [0, 0, 0, 5, 0, 0, 0, 0, 0, 5]),  # 8: 5 of 10 is not > 5; sadness-NF tie
    # 9: raw 4 of 10 is no majority, but after zeroing the six single votes 4 of 4 is: happiness.
    ("PublicTest", "fer0000009.png", [0, 4, 0, 1, 1, 1, 1, 1, 1, 0]),
    ("PublicTest", "fer0000010.png", [0, 0, 0, 0, 6, 0, 4, 0, 0, 0]),  # 10: anger
    ("PrivateTest", "fer0000012.png", [0, 0, 0, 0, 0, 0, 9, 1, 0, 0]),  # 11: name reused by row 12: dropped
    ("PrivateTest", "fer0000012.png", [0, 0, 0, 0, 0, 7, 3, 0, 0, 0]),  # 12: disgust
    ("PrivateTest", "fer0000013.png", [0, 0, 0, 0, 0, 0, 9, 1, 0, 0]),  # 13: fear
]
# Rows kept and their labels (EXPRESSIONS order: neutral 0, happiness 1, surprise 2, sadness 3, anger 4,
# disgust 5, fear 6, contempt 7), worked out in the comments above.
MAJORITY = {"train": ([0, 5], [0, 7]), "val": ([9, 10], [1, 4]), "test": ([12, 13], [5, 6])}
PLURALITY = {"train": ([0, 1, 5], [0, 0, 7]), "val": ([9, 10], [1, 4]), "test": ([12, 13], [5, 6])}


def _pixels(row: int) -> np.ndarray:
    return ((row * 7 + np.arange(48 * 48)) % 256).astype(np.uint8).reshape(48, 48)


def _write_text(path: Path, lines: list[str]) -> Path:
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt", newline="") as file:
            file.write(text)
    else:
        path.write_text(text)
    return path


def write_fer_pair(folder: Path, rows=FER_ROWS, *, gz: bool = False, pixel_text=None) -> tuple[Path, Path]:
    """fer2013.csv[.gz] and fer2013new.csv in the original formats; ``pixel_text(row)`` overrides pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    fer_lines, vote_lines = [",".join(FER_HEADER)], [",".join(VOTES_HEADER)]
    for index, (usage, name, votes) in enumerate(rows):
        pixels = pixel_text(index) if pixel_text else " ".join(map(str, _pixels(index).ravel()))
        fer_lines.append(f"{index % 7},{pixels},{usage}")
        vote_lines.append(",".join([usage, name, *map(str, votes)]))
    fer = _write_text(folder / ("fer2013.csv.gz" if gz else "fer2013.csv"), fer_lines)
    return fer, _write_text(folder / "fer2013new.csv", vote_lines)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("rule, expected", [("majority", MAJORITY), ("plurality", PLURALITY)])
def test_ferplus_labels_images_and_splits(tmp_path: Path, gz: bool, rule: str, expected: dict) -> None:
    data = load_ferplus(*write_fer_pair(tmp_path, gz=gz), label_rule=rule)
    assert data.name == "ferplus" and list(data.splits) == ["train", "val", "test"]
    for split_name, (rows, labels) in expected.items():
        split = data.split(split_name)
        assert split.images.shape == (len(rows), 48, 48, 1) and split.images.dtype == np.uint8
        np.testing.assert_array_equal(split.images[..., 0], np.stack([_pixels(row) for row in rows]))
        np.testing.assert_array_equal(split.expression, labels)
        np.testing.assert_array_equal(split.gender, -1)
        assert np.isnan(split.age).all()
    assert data.metadata["label_rule"] == rule


def test_ferplus_metadata_counts_each_drop_reason(tmp_path: Path) -> None:
    dropped = json.loads(load_ferplus(*write_fer_pair(tmp_path)).metadata["dropped"])
    # Training rows 0-7: 6 has no name; 1, 4, 7 have no majority; 2 (NF) and 3 (unknown) lose.
    assert dropped["train"] == {"no_image_name": 1, "duplicate_image_name": 0, "no_winner": 3,
                                "unknown_or_nf_winner": 2}
    assert dropped["val"]["no_winner"] == 1 and dropped["test"]["duplicate_image_name"] == 1


def test_ferplus_label_rules_on_vote_arrays() -> None:
    votes = np.array([row[2] for row in FER_ROWS])
    # -3 = no winner, -4 = unknown/NF winner; rows 6 and 11 get labels here (names are checked elsewhere).
    np.testing.assert_array_equal(ferplus_labels(votes, "majority"),
                                  [0, -3, -4, -4, -3, 7, 0, -3, -3, 1, 4, 6, 5, 6])
    np.testing.assert_array_equal(ferplus_labels(votes, "plurality"),
                                  [0, 0, -4, -4, -3, 7, 0, -3, -3, 1, 4, 6, 5, 6])
    with pytest.raises(ValueError, match="unknown FER\\+ label rule 'vote'.*majority, plurality"):
        ferplus_labels(votes, "vote")  # type: ignore[arg-type]


def _pixels_with(bad_row: int, value: str):
    """Pixel text per row, with pixel 10 of ``bad_row`` replaced by ``value``."""
    def text(row: int) -> str:
        values = [str(v) for v in _pixels(row).ravel()]
        if row == bad_row:
            values[10] = value
        return " ".join(values)
    return text


@pytest.mark.parametrize("pixel_text, message", [
    (lambda row: "1 2 3" if row == 3 else _pixels_with(-1, "")(row),
     r"row 3 \(line 5\) has 3 pixel values, expected 2304"),
    (_pixels_with(2, "x1"), r"row 2 \(line 4\) has pixel value 'x1'"),
    (_pixels_with(5, "256"), r"row 5 \(line 7\) has pixel value '256'"),
    (_pixels_with(13, "-4"), r"row 13 \(line 15\) has pixel value '-4'"),
])
def test_ferplus_bad_pixels_name_the_row(tmp_path: Path, pixel_text, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_ferplus(*write_fer_pair(tmp_path, pixel_text=pixel_text))


def test_ferplus_bad_files_raise_actionable_errors(tmp_path: Path) -> None:
    fer, votes = write_fer_pair(tmp_path / "good")
    bad_header = _write_text(tmp_path / "bad.csv", ["emotion,pixel,Usage", "0,1 2,Training"])
    with pytest.raises(ValueError, match="header 'emotion,pixel,Usage', expected 'emotion,pixels,Usage'"):
        load_ferplus(bad_header, votes)
    bad_votes = _write_text(tmp_path / "votes.csv", ["Usage,Image name,neutral"])
    with pytest.raises(ValueError, match="expected 'Usage,Image name,neutral,happiness,.*,unknown,NF'"):
        load_ferplus(fer, bad_votes)
    _, short_votes = write_fer_pair(tmp_path / "short", FER_ROWS[:-1])
    with pytest.raises(ValueError, match="has 13 rows but .* has 14; they are joined row by row"):
        load_ferplus(fer, short_votes)
    swapped = [(("PublicTest" if i == 4 else usage), name, votes) for i, (usage, name, votes) in enumerate(FER_ROWS)]
    _, swapped_votes = write_fer_pair(tmp_path / "swapped", swapped)
    with pytest.raises(ValueError, match=r"Usage disagrees in 1 row\(s\), first at row 4 .*'Training'.*'PublicTest'"):
        load_ferplus(fer, swapped_votes)
    with pytest.raises(ValueError, match="unknown FER\\+ label rule"):
        load_ferplus(fer, votes, label_rule="mean")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- AffectNet fixture

BACKGROUND = (10, 20, 30)


def _colour(image_id: int) -> tuple[int, int, int]:
    return (40 + 5 * image_id, 250 - 5 * image_id, (image_id * 37) % 256)


def _face_image(image_id: int, box: tuple[int, int, int, int], mode: str) -> Image.Image:
    """24x20 image, background outside the (clipped) face box, the image's own colour inside."""
    pixels = np.full((20, 24, 3), BACKGROUND, dtype=np.uint8)
    x, y, width, height = box
    pixels[max(0, y):y + height, max(0, x):x + width] = _colour(image_id)
    image = Image.fromarray(pixels)
    return image.convert("RGBA") if mode == "RGBA" else image


# (code, box, kind): kind png / jpg / rgba / missing / broken
BOX = (4, 2, 12, 12)
AFFECTNET_TRAIN = ([(0, BOX, "png")] * 5 + [(1, BOX, "png")] * 4 + [(2, (16, 10, 20, 20), "png")]  # box clipped
                   + [(2, (-3, -3, 10, 10), "png"), (6, BOX, "jpg"), (9, BOX, "png"), (3, BOX, "missing"),
                      (7, BOX, "broken")])
AFFECTNET_VAL = [(code, BOX, "rgba" if code == 4 else "png") for code in range(8)] + [(10, BOX, "png")]


def write_affectnet(root: Path) -> Path:
    """AffectNet's layout: file lists (training.csv with header, validation.csv without) and images."""
    lists = root / "Manually_Annotated_file_lists"
    lists.mkdir(parents=True)
    image_id = 0
    for file_name, rows, header in (("training.csv", AFFECTNET_TRAIN, True), ("validation.csv", AFFECTNET_VAL, False)):
        lines = [",".join(AFFECTNET_HEADER)] if header else []
        for code, box, kind in rows:
            rel = f"{image_id % 3}/img{image_id:03d}.{'jpg' if kind == 'jpg' else 'png'}"
            path = root / "Manually_Annotated_Images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if kind == "broken":
                path.write_bytes(b"not an image")
            elif kind != "missing":
                _face_image(image_id, box, kind).save(path, **({"quality": 95} if kind == "jpg" else {}))
            landmarks = ";".join(["1.5"] * 136)
            lines.append(f"{rel},{box[0]},{box[1]},{box[2]},{box[3]},{landmarks},{code},0.5,-0.25")
            image_id += 1
        (lists / file_name).write_text("\n".join(lines) + "\n")
    return root


def _ids(images: np.ndarray) -> list[int]:
    """Which fixture image each crop came from, by its (uniform) colour."""
    centre = images[:, images.shape[1] // 2, images.shape[2] // 2].astype(int)
    table = np.array([_colour(i) for i in range(40)])
    return [int(np.abs(table - pixel).sum(axis=1).argmin()) for pixel in centre]


def test_affectnet_mapping_cap_crop_and_counts(tmp_path: Path) -> None:
    root = write_affectnet(tmp_path / "affectnet")
    with pytest.warns(UserWarning, match="1 image file\\(s\\) missing .* and 1 unreadable"):
        data = load_affectnet(root, image_size=6, cap_per_class=3, seed=0)
    train, test = data.split("train"), data.split("test")
    assert list(data.splits) == ["train", "test"]
    # Train: neutral 5 -> 3 and happy 4 -> 3 (capped), sad 2, anger 1 (a JPEG); code 9 dropped,
    # surprise's file missing, contempt's file broken. EXPRESSIONS order: neutral, happiness,
    # surprise, sadness, anger, disgust, fear, contempt.
    np.testing.assert_array_equal(np.bincount(train.expression, minlength=8), [3, 3, 0, 2, 1, 0, 0, 0])
    ids = _ids(train.images)
    assert set(ids[:3]) <= {0, 1, 2, 3, 4} and set(ids[3:6]) <= {5, 6, 7, 8} and ids[6:] == [9, 10, 11]
    # AffectNet codes 0..7 = Neutral, Happy, Sad, Surprise, Fear, Disgust, Anger, Contempt -> FER+ indices.
    np.testing.assert_array_equal(test.expression, [0, 1, 3, 2, 6, 5, 4, 7])
    assert _ids(test.images) == list(range(15, 23))  # ids 0-14 are the training rows
    # Crops hold only the face colour: the box (also when clipped at either edge) was cut out exactly.
    png = np.concatenate([train.images[:8], test.images])
    np.testing.assert_array_equal(png, np.broadcast_to(png[:, :1, :1], png.shape))
    # JPEG: lossy (chroma bleeds in at the box edges) but the same colour in the middle of the crop.
    assert np.abs(train.images[8, 2:4, 2:4].astype(int) - _colour(11)).max() <= 8
    assert train.images.shape[1:] == (6, 6, 3) and (train.gender == -1).all() and np.isnan(test.age).all()
    stats = json.loads(data.metadata["stats"])
    assert stats["train"]["missing_images"] == 1 and stats["train"]["unreadable_images"] == 1
    assert stats["train"]["dropped_codes_8_to_10"] == 1 and stats["test"]["dropped_codes_8_to_10"] == 1
    # The same seed draws the same capped rows.
    with pytest.warns(UserWarning):
        again = load_affectnet(root, image_size=6, cap_per_class=3, seed=0)
    np.testing.assert_array_equal(again.split("train").images, train.images)


def test_cap_classes_keeps_at_most_cap_per_label_reproducibly() -> None:
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    kept = cap_classes(labels, cap=3, seed=5)
    np.testing.assert_array_equal(np.bincount(labels[kept]), [3, 2, 1])
    np.testing.assert_array_equal(kept, cap_classes(labels, cap=3, seed=5))
    with pytest.raises(ValueError, match="cap per class must be >= 1, got 0"):
        cap_classes(labels, cap=0, seed=0)


def test_affectnet_bad_header_and_nothing_left(tmp_path: Path) -> None:
    root = write_affectnet(tmp_path / "a")
    (root / "Manually_Annotated_file_lists" / "training.csv").write_text("path,x,y\nfoo.jpg,1,2\n")
    with pytest.raises(ValueError, match="expected the header 'subDirectory_filePath,face_x"):
        load_affectnet(root)
    root = write_affectnet(tmp_path / "b")
    for image in (root / "Manually_Annotated_Images").rglob("*.*"):
        image.unlink()
    empty = "no usable image left in split\\(s\\) \\['train', 'test'\\]"
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=empty):
        load_affectnet(root)


# ---------------------------------------------------------------------------------------- UTKFace fixture

UTK_VALID = [(25, 0, ".jpg.chip.jpg"), (3, 1, ".jpg"), (61, 1, ".jpg.chip.jpg"), (40, 0, ".jpg"), (8, 0, ".jpg"),
             (90, 1, ".jpg"), (33, 1, ".jpg.chip.jpg"), (1, 0, ".jpg"), (17, 1, ".jpg"), (52, 0, ".jpg")]
UTK_MALFORMED = ["abc_0_1_x.jpg", "25_2_0_x.jpg", "25_0.jpg"]


def _utk_name(index: int) -> str:
    age, gender, suffix = UTK_VALID[index]
    return f"{age}_{gender}_{index % 5}_2017010{index}120000000{suffix}"


def _utk_colour(index: int) -> tuple[int, int, int]:
    return (20 * index, 250 - 20 * index, 128)


def write_utkface(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for index in range(len(UTK_VALID)):
        size = (100, 120) if index == 4 else (200, 200)  # one image of another size: resized
        mode = "L" if index == 7 else "RGB"  # a grey JPEG: converted to RGB
        colour = _utk_colour(index)[0] if mode == "L" else _utk_colour(index)
        Image.new(mode, size, colour).save(folder / _utk_name(index), format="JPEG", quality=95)
    for name in UTK_MALFORMED:
        Image.new("RGB", (200, 200)).save(folder / name, format="JPEG")
    (folder / "notes.txt").write_text("not a face")
    return folder


@pytest.mark.parametrize("name, expected", [
    ("25_0_0_20170116174525125.jpg.chip.jpg", (25, 0)), ("1_1_4_x.jpg", (1, 1)), ("116_0_3_x.JPG", (116, 0)),
    ("abc_0_1_x.jpg", None), ("25_2_0_x.jpg", None), ("25_0.jpg", None), ("25_0_0_.jpg", None),
    ("131_0_0_x.jpg", None), ("25_0_0_x.png", None), ("39_1_20170116174525125.jpg.chip.jpg", None),
    ("\u00b25_0_0_x.jpg", None),  # '²' passes str.isdigit but is no age
])
def test_parse_utkface_name(name: str, expected) -> None:
    assert parse_utkface_name(name) == expected


def test_utkface_labels_split_and_counts(tmp_path: Path) -> None:
    folder = write_utkface(tmp_path / "UTKFace")
    with pytest.warns(UserWarning) as caught:
        data = load_utkface(folder, seed=0)
    messages = " | ".join(str(warning.message) for warning in caught)
    assert "skipped 3 file(s) with malformed names" in messages and "1 image(s) were not 200x200" in messages
    meta = data.metadata
    assert (meta["malformed_names"], meta["resized_images"], meta["ignored_non_jpg"]) == ("3", "1", "1")
    # 10 valid names: round(0.6·10) = 6 train, round(0.2·10) = 2 val, 2 test, drawn from the sorted names.
    names = sorted(_utk_name(i) for i in range(len(UTK_VALID)))
    order = np.random.default_rng(0).permutation(10)
    expected = {"train": order[:6], "val": order[6:8], "test": order[8:]}
    for split_name, rows in expected.items():
        split = data.split(split_name)
        indices = [int(names[row].split("_")[3][7]) for row in rows]  # fixture index from the datetime field
        np.testing.assert_array_equal(split.age, [UTK_VALID[i][0] for i in indices])
        np.testing.assert_array_equal(split.gender, [UTK_VALID[i][1] for i in indices])
        assert split.images.shape == (len(rows), 200, 200, 3) and (split.expression == -1).all()
        # Each image is its file's (uniform) colour, so images and labels were kept together.
        for image, i in zip(split.images, indices):
            colour = (_utk_colour(i)[0],) * 3 if i == 7 else _utk_colour(i)
            assert np.abs(image.astype(int) - colour).max() <= 3
    assert json.loads(meta["gender_counts"]) == [5, 5]
    with pytest.warns(UserWarning):
        other_seed = load_utkface(folder, seed=1)
    assert not np.array_equal(other_seed.split("train").age, data.split("train").age)


def test_split_rows_sizes_and_bad_fractions() -> None:
    # 0.6·23,689 = 14,213.4 -> 14,213; 0.2·23,689 = 4,737.8 -> 4,738; the rest 4,738: the paper's split.
    assert [len(rows) for rows in split_rows(23689, (0.6, 0.2, 0.2), 0).values()] == [14213, 4738, 4738]
    rows = split_rows(6000, (0.6, 0.2, 0.2), 3)
    assert [len(r) for r in rows.values()] == [3600, 1200, 1200]
    assert sorted(np.concatenate(list(rows.values()))) == list(range(6000))
    with pytest.raises(ValueError, match="summing to 1, got \\(0.6, 0.2, 0.1\\)"):
        split_rows(10, (0.6, 0.2, 0.1), 0)


# --------------------------------------------------------------------------------- sources and the cache

def test_find_sources_names_what_each_task_lacks(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        find_sources(tmp_path / "nowhere")
    write_fer_pair(tmp_path / "ferplus", gz=True)
    found = find_sources(tmp_path, "fer")
    fer_dir = tmp_path / "ferplus"
    assert found == {"fer2013": fer_dir / "fer2013.csv.gz", "fer2013new": fer_dir / "fer2013new.csv"}
    with pytest.raises(FileNotFoundError, match="task 'gender' .*utkface is missing \\(expected utkface/UTKFace/"):
        find_sources(tmp_path, "gender")
    (tmp_path / "affectnet" / "Manually_Annotated_Images").mkdir(parents=True)
    lacks = "affectnet is incomplete, it lacks Manually_Annotated_file_lists/training.csv"
    with pytest.raises(FileNotFoundError, match=lacks):
        find_sources(tmp_path, "fer")
    with pytest.raises(ValueError, match="unknown task 'emotion'; valid names: age, fer, gender"):
        find_sources(tmp_path, "emotion")


def test_prepare_fer_alone_caches_and_reconverts_on_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, cache = tmp_path / "data", tmp_path / "cache"
    _, votes = write_fer_pair(root / "ferplus")
    path = prepare_real_data("fer", root, cache)
    data = open_face_store(path)
    assert data.name == "ferplus" and data.split("train").image_shape == (48, 48, 1)
    assert [len(data.split(name)) for name in ("train", "val", "test")] == [2, 2, 2]
    assert data.metadata["ferplus.label_rule"] == "majority"
    assert list(json.loads(data.metadata["source_checksums"])) == ["ferplus"]

    def no_conversion(*args, **kwargs):
        raise AssertionError("the cached store should have been reused")

    monkeypatch.setattr(sources_module, "load_ferplus", no_conversion)
    start = time.perf_counter()
    assert prepare_real_data("fer", root, cache) == path
    assert time.perf_counter() - start < 2.0
    monkeypatch.undo()

    votes.write_text(votes.read_text().replace("fer0000000.png,6,0,1", "fer0000000.png,0,6,1"))  # row 0 -> happiness
    changed = prepare_real_data("fer", root, cache)
    assert changed != path and open_face_store(changed).split("train").expression.tolist() == [1, 7]
    plurality = prepare_real_data("fer", root, cache, label_rule="plurality")
    assert plurality not in (path, changed) and len(open_face_store(plurality).split("train")) == 3


def test_prepare_fer_joins_affectnet(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_fer_pair(root / "ferplus")
    write_affectnet(root / "affectnet")
    with pytest.warns(UserWarning, match="missing"):
        path = prepare_real_data("fer", root, tmp_path / "cache", union_size=16, affectnet_cap_per_class=3)
    data = open_face_store(path)
    assert list(data.splits) == ["train", "val", "test", "test_affectnet"]
    train = data.split("train")
    # FER+ train (2 rows: neutral, contempt) followed by the capped AffectNet train (3 + 3 + 2 + 1 = 9).
    assert len(train) == 2 + 9 and train.image_shape == (16, 16, 3)
    np.testing.assert_array_equal(train.expression[:2], [0, 7])
    np.testing.assert_array_equal(np.bincount(train.expression[2:], minlength=8), [3, 3, 0, 2, 1, 0, 0, 0])
    assert json.loads(data.metadata["train_parts"]) == [["ferplus", 0, 2], ["affectnet", 2, 11]]
    # FER+ grey copied into 3 equal channels, resized 48 -> 16 from the original pixels.
    fer = train.images[:2]
    np.testing.assert_array_equal(fer[..., 0], fer[..., 2])
    resized = np.asarray(Image.fromarray(_pixels(0)).resize((16, 16), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(fer[0, ..., 0], resized)
    assert len(data.split("val")) == 2 and len(data.split("test")) == 2
    np.testing.assert_array_equal(data.split("test_affectnet").expression, [0, 1, 3, 2, 6, 5, 4, 7])
    # Converted through a memory-mapped scratch file, with the unreadable row squeezed out in place: the
    # same pixels as AffectNet decoded in RAM, and the scratch file is gone.
    with pytest.warns(UserWarning, match="missing"):
        in_ram = load_affectnet(root / "affectnet", image_size=16, cap_per_class=3, seed=0)
    np.testing.assert_array_equal(train.images[2:], in_ram.split("train").images)
    np.testing.assert_array_equal(data.split("test_affectnet").images, in_ram.split("test").images)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [path.name, path.name + ".sha256.json"]


def test_prepare_gender_and_age_share_one_utkface_store(tmp_path: Path) -> None:
    root, cache = tmp_path / "data", tmp_path / "cache"
    folder = write_utkface(root / "utkface" / "UTKFace")
    with pytest.warns(UserWarning):
        path = prepare_real_data("gender", root, cache)
    assert prepare_real_data("age", root, cache) == path and path.name.startswith("utkface-")
    data = open_face_store(path)
    assert data.name == "utkface" and data.metadata["utkface.malformed_names"] == "3"
    assert len(data.split("train").labels("age")) == 6
    Image.new("RGB", (200, 200)).save(folder / "70_1_0_20170102000000000.jpg", format="JPEG")
    with pytest.warns(UserWarning):
        assert prepare_real_data("age", root, cache) != path  # a new file: a new store


def test_utkface_stored_at_the_runs_largest_input_size(tmp_path: Path) -> None:
    """A grid whose networks read 48 px stores 48 px faces (shrunk once, with PIL's filter), under its own key."""
    root, cache = tmp_path / "data", tmp_path / "cache"
    folder = write_utkface(root / "utkface" / "UTKFace")
    with pytest.warns(UserWarning):
        native = prepare_real_data("gender", root, cache)
        small = prepare_real_data("gender", root, cache, max_input_size=48)
    assert small != native
    assert prepare_real_data("gender", root, cache, max_input_size=500) == native  # never stored above 200 px
    big, little = open_face_store(native).split("train"), open_face_store(small).split("train")
    assert little.images.shape[1:] == (48, 48, 3) and big.images.shape[1:] == (200, 200, 3)
    expected = np.stack([np.asarray(Image.fromarray(image).resize((48, 48), Image.Resampling.BILINEAR))
                         for image in big.images])
    np.testing.assert_array_equal(little.images, expected)
    np.testing.assert_array_equal(little.age, big.age)
    with pytest.raises(ValueError, match="never above the native size"):
        load_utkface(folder, image_size=224)


def test_the_grid_stores_the_fer_affectnet_union_at_the_presets_input_size(tmp_path: Path) -> None:
    """Under `paper` (224 px networks) AffectNet faces are cropped from their originals straight to 224 px
    (not stored at 48 px and upsampled per batch), and the size and FER+ label rule are in the cache key."""
    from dataclasses import replace

    from grid.data import prepare_data
    from occkd_core.presets import load_preset

    root, storage = tmp_path / "data", tmp_path / "storage"
    write_fer_pair(root / "ferplus")
    write_affectnet(root / "affectnet")
    paper = load_preset("paper")
    # archs=(): a conversion test; its 14 training rows are far too few for any stage's triplet mining
    with pytest.warns(UserWarning, match="missing"):
        prepared = prepare_data(paper, ["fer"], storage, root, archs=())["fer"]
    data = open_face_store(prepared.path)
    for name in ("train", "val", "test", "test_affectnet"):
        assert data.split(name).image_shape == (224, 224, 3), name
    affectnet = data.split("test_affectnet").images
    # each crop is its face box alone, resized from the original image: one colour over all 224 × 224 pixels
    assert _ids(affectnet) == list(range(15, 23))
    np.testing.assert_array_equal(affectnet, np.broadcast_to(affectnet[:, :1, :1], affectnet.shape))
    assert json.loads(data.metadata["settings"])["union_size"] == 224
    with pytest.warns(UserWarning, match="missing"):
        mini = prepare_data(load_preset("mini"), ["fer"], storage, root, archs=())["fer"]
    assert mini.path != prepared.path and mini.fingerprint != prepared.fingerprint
    assert open_face_store(mini.path).split("test_affectnet").image_shape == (48, 48, 3)
    # the preset's FER+ label rule reaches the conversion (and the cache key)
    plurality = replace(paper, data=replace(paper.data, label_rule="plurality"))
    with pytest.warns(UserWarning, match="missing"):
        voted = prepare_data(plurality, ["fer"], storage, root, archs=())["fer"]
    assert voted.path != prepared.path
    assert open_face_store(voted.path).metadata["ferplus.label_rule"] == "plurality"
