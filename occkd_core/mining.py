"""Offline hard-triplet mining, once per epoch (spec §7, §15 #23-25; J §3.2, C §III-B).

For every occluded training image a′ (each is an anchor once), from one random pool R shared by
all anchors of the epoch:

* positive p  = the same-class pool image whose FULL-face teacher embedding E_T(x_p) is FARTHEST
  from the anchor's student embedding E_S(a′);
* negative n′ = the other-class pool image whose OCCLUDED student embedding E_S(x′_n) is CLOSEST
  to E_S(a′).

Age has no classes: a pool image is "same class" when |age_j − age_a| < threshold, else it is a
negative (spec §15 #25).

Distances are Euclidean on the embeddings as passed in. When the triplet loss L2-normalises
(spec §15 #20), pass normalised embeddings here too, so that mining ranks candidates by the
distance the loss sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MinedTriplets:
    """One hard triplet per anchor that found both a positive and a negative in the pool.

    All three index tensors index the training set and live on the embeddings' device.
    """

    anchors: Tensor  # long [M]: anchors; their OCCLUDED images are embedded by the student
    positives: Tensor  # long [M]: positives; use the cached teacher embedding of their FULL image
    negatives: Tensor  # long [M]: negatives; their OCCLUDED images are embedded by the student
    num_dropped: int  # anchors with no positive or no negative in the pool

    def __len__(self) -> int:
        return int(self.anchors.shape[0])


def draw_pool(num_train: int, fraction: float, generator: torch.Generator) -> Tensor:
    """The epoch's candidate pool R: round(fraction·N) (at least 1) distinct training indices, sorted; long [P] on the generator's device."""
    if num_train < 1:
        raise ValueError(f"num_train must be >= 1, got {num_train}")
    if not (0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1] (J uses 0.1 for expressions, 0.2 for UTKFace), got {fraction!r}")
    size = max(1, round(fraction * num_train))
    pool = torch.randperm(num_train, generator=generator, device=generator.device)[:size]
    # Sorted so that ties in mining go to the lowest training index, whatever the draw order.
    return pool.sort().values


def _check_inputs(
    student_embeddings: Tensor, teacher_embeddings: Tensor, labels: Tensor, pool: Tensor, age_threshold: float | None
) -> None:
    if student_embeddings.ndim != 2:
        raise ValueError(f"student_embeddings must be [N, D], got shape {tuple(student_embeddings.shape)}")
    if teacher_embeddings.shape != student_embeddings.shape:
        raise ValueError(
            f"teacher_embeddings must have the student's shape {tuple(student_embeddings.shape)} (one full-face "
            f"embedding per training image, same architecture), got {tuple(teacher_embeddings.shape)}"
        )
    if teacher_embeddings.device != student_embeddings.device:
        raise ValueError(
            f"student_embeddings are on {student_embeddings.device} but teacher_embeddings on "
            f"{teacher_embeddings.device}; move them to one device"
        )
    num_train = student_embeddings.shape[0]
    if labels.shape != (num_train,):
        raise ValueError(f"labels must be [N] with N = {num_train}, got shape {tuple(labels.shape)}")
    if age_threshold is None and labels.is_floating_point():
        raise ValueError(
            "labels are floating point (ages?) but age_threshold is None; pass age_threshold (5.0 for age, "
            "spec §7) or integer class ids"
        )
    if age_threshold is not None and not age_threshold > 0:
        raise ValueError(f"age_threshold must be > 0 years, got {age_threshold!r}")
    if pool.ndim != 1 or pool.numel() == 0 or pool.is_floating_point() or pool.dtype == torch.bool:
        raise ValueError(f"pool must be a non-empty 1-D integer tensor of indices, got {pool.dtype} {tuple(pool.shape)}")
    if int(pool.min()) < 0 or int(pool.max()) >= num_train:
        raise ValueError(
            f"pool indices must lie in [0, {num_train}), got min {int(pool.min())} and max {int(pool.max())}"
        )
    for name, emb in (("student_embeddings", student_embeddings), ("teacher_embeddings", teacher_embeddings)):
        if not torch.isfinite(emb).all():
            raise ValueError(f"{name} contain NaN or inf; the network has probably diverged (check the learning rate)")


def _same_class(anchor_labels: Tensor, pool_labels: Tensor, age_threshold: float | None) -> Tensor:
    """Bool [A, P]: pool image j counts as the anchor's class (age: |Δage| < threshold)."""
    if age_threshold is None:
        return anchor_labels[:, None] == pool_labels[None, :]
    # float64: an age gap of exactly the threshold must land on the negative side (spec §15 #25).
    gap = (anchor_labels.double()[:, None] - pool_labels.double()[None, :]).abs()
    return gap < age_threshold


@torch.no_grad()
def mine_hard_triplets(
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    labels: Tensor,
    pool: Tensor,
    *,
    age_threshold: float | None = None,
    chunk_size: int = 4096,
) -> MinedTriplets:
    """Hardest positive (farthest E_T(x_j)) and hardest negative (closest E_S(x′_j)) from ``pool`` for every anchor, J §3.2.

    ``student_embeddings`` [N, D] = E_S(x′) of all occluded training images (student in eval mode),
    ``teacher_embeddings`` [N, D] = cached E_T(x) of the full images, ``labels`` [N] = class ids
    (or ages when ``age_threshold`` is given), ``pool`` long [P]. The anchor itself may be its own
    positive: the teacher's embedding of the anchor's full image is a legitimate same-class target.
    A negative is never the anchor, since it has another label.

    Runs on the embeddings' device in chunks of ``chunk_size`` anchors: memory O(chunk_size · P).
    Exact ties go to the candidate that comes first in ``pool`` (``torch.cdist`` may round
    distances that differ by less than float precision into ties, or break such ties).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_inputs(student_embeddings, teacher_embeddings, labels, pool, age_threshold)
    device = student_embeddings.device
    # At least float32: half-precision distances would turn many near-ties into ties.
    compute_dtype = torch.promote_types(student_embeddings.dtype, torch.float32)
    student_embeddings = student_embeddings.to(compute_dtype)
    pool = pool.to(device=device, dtype=torch.long)
    labels = labels.to(device)
    pool_labels = labels[pool]
    pool_teacher = teacher_embeddings[pool].to(compute_dtype)
    pool_student = student_embeddings[pool]
    num_train = student_embeddings.shape[0]

    positive_slots, negative_slots, has_both = [], [], []
    for start in range(0, num_train, chunk_size):
        anchor_emb = student_embeddings[start : start + chunk_size]
        same = _same_class(labels[start : start + chunk_size], pool_labels, age_threshold)
        # Euclidean, not squared: the square is monotone, so argmax/argmin are the same.
        to_teacher = torch.cdist(anchor_emb, pool_teacher)
        to_student = torch.cdist(anchor_emb, pool_student)
        positive_slots.append(to_teacher.masked_fill(~same, float("-inf")).argmax(dim=1))
        negative_slots.append(to_student.masked_fill(same, float("inf")).argmin(dim=1))
        has_both.append(same.any(dim=1) & (~same).any(dim=1))

    keep = torch.cat(has_both)
    return MinedTriplets(
        anchors=torch.arange(num_train, device=device)[keep],
        positives=pool[torch.cat(positive_slots)[keep]],
        negatives=pool[torch.cat(negative_slots)[keep]],
        num_dropped=int((~keep).sum()),
    )


@torch.no_grad()
def mine_hard_triplets_reference(
    student_embeddings: Tensor,
    teacher_embeddings: Tensor,
    labels: Tensor,
    pool: Tensor,
    *,
    age_threshold: float | None = None,
) -> MinedTriplets:
    """The same mining as :func:`mine_hard_triplets`, one anchor at a time: the obviously correct version, for tests and benchmarks."""
    _check_inputs(student_embeddings, teacher_embeddings, labels, pool, age_threshold)
    device = student_embeddings.device
    pool_list = [int(j) for j in pool]
    label_list = labels.tolist()
    anchors, positives, negatives = [], [], []
    for i in range(student_embeddings.shape[0]):
        if age_threshold is None:
            same = [label_list[j] == label_list[i] for j in pool_list]
        else:
            same = [abs(float(label_list[j]) - float(label_list[i])) < age_threshold for j in pool_list]
        candidates_pos = [j for j, s in zip(pool_list, same) if s]
        candidates_neg = [j for j, s in zip(pool_list, same) if not s]
        if not candidates_pos or not candidates_neg:
            continue
        dist_pos = (student_embeddings[i] - teacher_embeddings[candidates_pos]).pow(2).sum(dim=1)
        dist_neg = (student_embeddings[i] - student_embeddings[candidates_neg]).pow(2).sum(dim=1)
        anchors.append(i)
        positives.append(candidates_pos[int(dist_pos.argmax())])
        negatives.append(candidates_neg[int(dist_neg.argmin())])

    def as_tensor(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return MinedTriplets(
        anchors=as_tensor(anchors),
        positives=as_tensor(positives),
        negatives=as_tensor(negatives),
        num_dropped=student_embeddings.shape[0] - len(anchors),
    )
