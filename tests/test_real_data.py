"""The loaders on the real FER+ and UTKFace files in ../shared/data, when that folder exists (skipped otherwise:
a user's clone has none). The expected numbers were measured on those files; timings are printed (-s)."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import numpy as np
import pytest

from occkd_core.data.ferplus import ferplus_labels, load_ferplus, read_ferplus_votes
from occkd_core.data.utkface import load_utkface

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FER_CSV = DATA / "ferplus" / "fer2013.csv.gz"
VOTES_CSV = DATA / "ferplus" / "fer2013new.csv"
UTKFACE = DATA / "utkface" / "UTKFace"


@pytest.mark.skipif(not (FER_CSV.is_file() and VOTES_CSV.is_file()), reason=f"no real FER+ files under {DATA}")
def test_real_ferplus_split_sizes_under_each_rule() -> None:
    start = time.perf_counter()
    data = load_ferplus(FER_CSV, VOTES_CSV)  # label_rule="majority"
    print(f"\nFER+: read and labelled 35,887 rows in {time.perf_counter() - start:.1f} s")
    # Microsoft's FERPlus "majority" rule; the papers report 25,045 / 3,191 / 3,137.
    assert [len(data.split(name)) for name in ("train", "val", "test")] == [25057, 3199, 3152]
    counts = json.loads(data.metadata["class_counts"])
    assert counts["train"] == [8739, 7287, 3149, 3013, 2099, 119, 532, 119]  # EXPRESSIONS order
    dropped = json.loads(data.metadata["dropped"])
    assert dropped["train"] == {"no_image_name": 148, "duplicate_image_name": 3, "no_winner": 3423,
                                "unknown_or_nf_winner": 78}

    # The first kept training row (row 1: row 0's 4 of 9 votes are no majority), parsed the slow obvious
    # way, matches the vectorised parse.
    with gzip.open(FER_CSV, "rt") as file:
        lines = [file.readline() for _ in range(3)]
    _emotion, pixels, usage = lines[2].strip().split(",")
    assert usage == "Training"
    np.testing.assert_array_equal(data.split("train").images[0, ..., 0],
                                  np.array(pixels.split(), dtype=np.uint8).reshape(48, 48))

    # Plurality and a strict raw majority, from the votes alone (no pixels needed).
    usage, names, votes = read_ferplus_votes(VOTES_CSV)
    assert ferplus_labels(votes[:2], "majority").tolist() == [-3, 0]  # no majority, then neutral
    named = names != ""
    plurality = ferplus_labels(votes, "plurality")
    assert [int((named & (usage == u) & (plurality >= 0)).sum()) for u in ("Training", "PublicTest", "PrivateTest")] \
        == [26940, 3396, 3376]  # before dropping the 4 rows whose image name is reused


@pytest.mark.skipif(not UTKFACE.is_dir(), reason=f"no real UTKFace folder under {DATA}")
def test_real_utkface_counts_and_split() -> None:
    start = time.perf_counter()
    data = load_utkface(UTKFACE, seed=0)
    print(f"\nUTKFace: converted 6,000 images in {time.perf_counter() - start:.1f} s")
    meta = data.metadata
    assert (meta["num_files"], meta["malformed_names"], meta["resized_images"], meta["unreadable_images"]) == \
        ("6000", "0", "0", "0")
    assert [len(data.split(name)) for name in ("train", "val", "test")] == [3600, 1200, 1200]
    genders = np.concatenate([data.split(name).gender for name in ("train", "val", "test")])
    assert np.bincount(genders).tolist() == [2655, 3345]  # male, female (the folder's README)
    ages = np.concatenate([data.split(name).age for name in ("train", "val", "test")])
    assert (ages.min(), ages.max()) == (1, 100)
    assert data.split("train").image_shape == (200, 200, 3)
