"""Known-value tests for occkd_core.mining (spec §7, §15 #23-25)."""

from __future__ import annotations

import pytest
import torch

from occkd_core.mining import MinedTriplets, draw_pool, mine_hard_triplets, mine_hard_triplets_reference

# A hand-built example in 2-D. Classes: images 0-2 are class 0, images 3-5 are class 1.
# Pool R = [1, 2, 3, 4]: class-0 candidates {1, 2}, class-1 candidates {3, 4}.
STUDENT = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [0.0, 1.0], [4.0, 3.0], [10.0, 10.0]])
TEACHER = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 4.0], [0.0, 2.0], [-3.0, 0.0], [-1.0, -1.0]])
LABELS = torch.tensor([0, 0, 0, 1, 1, 1])
POOL = torch.tensor([1, 2, 3, 4])
# Squared distances (positive: student anchor to TEACHER of candidate, farthest wins;
#                    negative: student anchor to STUDENT of candidate, closest wins):
# anchor 0 (0,0):   T1 (6,0) 36, T2 (0,4) 16        -> pos 1 | S3 (0,1) 1,  S4 (4,3) 25  -> neg 3
# anchor 1 (1,0):   T1 25,       T2 1+16=17         -> pos 1 | S3 1+1=2,    S4 9+9=18    -> neg 3
# anchor 2 (5,0):   T1 1,        T2 25+16=41        -> pos 2 | S3 25+1=26,  S4 1+9=10    -> neg 4
# anchor 3 (0,1):   T3 (0,2) 1,  T4 (-3,0) 9+1=10   -> pos 4 | S1 (1,0) 2,  S2 (5,0) 26  -> neg 1
# anchor 4 (4,3):   T3 16+1=17,  T4 49+9=58         -> pos 4 | S1 9+9=18,   S2 1+9=10    -> neg 2
# anchor 5 (10,10): T3 100+64=164, T4 169+100=269   -> pos 4 | S1 81+100=181, S2 25+100=125 -> neg 2
# Anchors 1 and 4 pick their own full-face teacher embedding as positive, which is allowed.
EXPECTED_POSITIVES = [1, 1, 2, 4, 4, 4]
EXPECTED_NEGATIVES = [3, 3, 4, 1, 2, 2]


@pytest.mark.parametrize("miner", [mine_hard_triplets, mine_hard_triplets_reference])
def test_hand_built_example(miner) -> None:
    mined = miner(STUDENT, TEACHER, LABELS, POOL)
    assert mined.anchors.tolist() == [0, 1, 2, 3, 4, 5]
    assert mined.positives.tolist() == EXPECTED_POSITIVES
    assert mined.negatives.tolist() == EXPECTED_NEGATIVES
    assert mined.num_dropped == 0
    assert mined.anchors.dtype == mined.positives.dtype == mined.negatives.dtype == torch.long
    assert len(mined) == 6


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_hand_built_example_in_chunks(chunk_size: int) -> None:
    mined = mine_hard_triplets(STUDENT, TEACHER, LABELS, POOL, chunk_size=chunk_size)
    assert mined.positives.tolist() == EXPECTED_POSITIVES
    assert mined.negatives.tolist() == EXPECTED_NEGATIVES


@pytest.mark.parametrize("miner", [mine_hard_triplets, mine_hard_triplets_reference])
def test_age_threshold_edge(miner) -> None:
    # Anchor 0 is 20 years old. Pool [1, 2, 3] has ages 25.0 (|Δ| = 5.0 -> negative),
    # 24.9 (|Δ| = 4.9 -> positive) and 30.0 (|Δ| = 10 -> negative).
    # Student distances from anchor 0 at (0,0): image 1 at (1,0) is 1, image 3 at (5,0) is 25,
    # so the closest negative is image 1, which is only a negative if |Δ| = 5 counts as one.
    ages = torch.tensor([20.0, 25.0, 24.9, 30.0])
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [5.0, 0.0]])
    teacher = torch.zeros(4, 2)
    mined = miner(student, teacher, ages, torch.tensor([1, 2, 3]), age_threshold=5.0)
    assert mined.anchors[0].item() == 0
    assert mined.positives[0].item() == 2  # the only candidate with |Δ| < 5
    assert mined.negatives[0].item() == 1


@pytest.mark.parametrize("miner", [mine_hard_triplets, mine_hard_triplets_reference])
def test_anchors_without_positive_or_negative_are_dropped(miner) -> None:
    student = torch.arange(10.0).reshape(5, 2)
    teacher = -student
    labels = torch.tensor([0, 0, 1, 1, 2])
    # Pool [0, 2] holds classes 0 and 1: anchor 4 (class 2) has no positive.
    mined = miner(student, teacher, labels, torch.tensor([0, 2]))
    assert mined.anchors.tolist() == [0, 1, 2, 3]
    assert mined.num_dropped == 1
    # Pool [0, 1] holds class 0 only: class-0 anchors have no negative, the others no positive.
    mined = miner(student, teacher, labels, torch.tensor([0, 1]))
    assert len(mined) == 0 and mined.num_dropped == 5
    assert mined.positives.shape == (0,) and mined.positives.dtype == torch.long


def _assert_same(a: MinedTriplets, b: MinedTriplets) -> None:
    assert torch.equal(a.anchors, b.anchors)
    assert torch.equal(a.positives, b.positives)
    assert torch.equal(a.negatives, b.negatives)
    assert a.num_dropped == b.num_dropped


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 200, 4096])
def test_vectorised_equals_reference_on_random_classes(chunk_size: int) -> None:
    # float64 so that the miner's matrix-product form of the distance cannot reorder near-ties.
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    teacher = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 5, (200,), generator=gen)
    pool = draw_pool(200, 0.1, gen)
    reference = mine_hard_triplets_reference(student, teacher, labels, pool)
    assert len(reference) > 150  # 20 candidates over 5 classes: nearly every anchor is kept
    _assert_same(mine_hard_triplets(student, teacher, labels, pool, chunk_size=chunk_size), reference)


@pytest.mark.parametrize("chunk_size", [3, 50, 4096])
def test_vectorised_equals_reference_on_random_ages(chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(150, 4, generator=gen, dtype=torch.float64)
    teacher = torch.randn(150, 4, generator=gen, dtype=torch.float64)
    ages = torch.randint(1, 90, (150,), generator=gen).float()  # whole years: many |Δ| = 5 exactly
    pool = draw_pool(150, 0.2, gen)
    reference = mine_hard_triplets_reference(student, teacher, ages, pool, age_threshold=5.0)
    assert reference.num_dropped > 0  # some anchors find no one within 5 years in 30 candidates
    _assert_same(mine_hard_triplets(student, teacher, ages, pool, age_threshold=5.0, chunk_size=chunk_size), reference)


def test_reference_on_a_sample_of_anchors_mines_those_rows_alike() -> None:
    """What the benchmark times: the per-anchor loop over some anchors gives the full run's rows for them."""
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(120, 6, generator=gen, dtype=torch.float64)
    teacher = torch.randn(120, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (120,), generator=gen)
    pool = draw_pool(120, 0.1, gen)
    full = mine_hard_triplets_reference(student, teacher, labels, pool)
    sample = torch.tensor([3, 17, 64, 119])
    part = mine_hard_triplets_reference(student, teacher, labels, pool, anchors=sample)
    at = [full.anchors.tolist().index(i) for i in part.anchors.tolist()]
    assert part.anchors.tolist() == [i for i in sample.tolist() if i in full.anchors.tolist()]
    assert part.num_dropped == len(sample) - len(part)
    assert torch.equal(part.positives, full.positives[at]) and torch.equal(part.negatives, full.negatives[at])


def test_draw_pool_is_deterministic_and_sized() -> None:
    first = draw_pool(100, 0.1, torch.Generator().manual_seed(7))
    again = draw_pool(100, 0.1, torch.Generator().manual_seed(7))
    other = draw_pool(100, 0.1, torch.Generator().manual_seed(8))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.shape == (10,) and first.dtype == torch.long  # round(0.1 * 100) = 10
    assert len(set(first.tolist())) == 10 and 0 <= first.min() and first.max() < 100
    assert torch.equal(first, first.sort().values)
    assert draw_pool(23, 0.2, torch.Generator().manual_seed(0)).shape == (5,)  # round(4.6) = 5
    assert draw_pool(5, 0.01, torch.Generator().manual_seed(0)).shape == (1,)  # round(0.05) = 0 -> at least 1
    assert draw_pool(6, 1.0, torch.Generator().manual_seed(0)).tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_draw_pool_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        draw_pool(10, fraction, torch.Generator())


def test_mining_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="age_threshold is None"):
        mine_hard_triplets(STUDENT, TEACHER, LABELS.float(), POOL)
    with pytest.raises(ValueError, match=r"pool indices must lie in \[0, 6\)"):
        mine_hard_triplets(STUDENT, TEACHER, LABELS, torch.tensor([1, 6]))
    with pytest.raises(ValueError, match="teacher_embeddings must have"):
        mine_hard_triplets(STUDENT, TEACHER[:5], LABELS, POOL)
    with pytest.raises(ValueError, match="labels must be"):
        mine_hard_triplets(STUDENT, TEACHER, LABELS[:5], POOL)
    with pytest.raises(ValueError, match="NaN"):
        mine_hard_triplets(STUDENT.clone().fill_(float("nan")), TEACHER, LABELS, POOL)
    with pytest.raises(ValueError, match="chunk_size"):
        mine_hard_triplets(STUDENT, TEACHER, LABELS, POOL, chunk_size=0)
