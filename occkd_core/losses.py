"""Loss functions of the three teacher-student objectives (spec §4.4, §6).

Every function is a pure function of tensors. Teacher tensors are detached here, so a caller cannot
leak gradients into the frozen teacher by mistake (spec §5 step 3, §15 #34). The ``*_kd_loss``
functions return their *weighted* terms by name; the training objective is the sum of the values,
and each term is logged on its own.

Tags: J = journal paper, C = ICPR 2020 paper (docs/method.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from occkd_core.tasks import TaskKind

_TASK_KINDS: tuple[TaskKind, ...] = ("classification", "regression")

# Floor under a squared distance before its square root: d/dx sqrt(x) is infinite at 0, and an
# anchor that sits exactly on its positive (e.g. a student initialised from the teacher on an
# image with nothing occluded that matters) must not produce NaN gradients.
_SQRT_EPS = 1e-12


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------


def _check_lam(lam: float) -> None:
    if not (0.0 <= lam <= 1.0):  # also rejects NaN
        raise ValueError(f"lam must be in [0, 1] (the weight of the distillation term), got {lam!r}")


def _check_kind(kind: str) -> None:
    if kind not in _TASK_KINDS:
        raise ValueError(f"unknown task kind {kind!r}; valid kinds: {', '.join(_TASK_KINDS)}")


def _check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _check_2d(name: str, x: Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [B, D], got shape {tuple(x.shape)}")


def _check_targets(outputs: Tensor, targets: Tensor) -> None:
    if targets.ndim != 1 or targets.shape[0] != outputs.shape[0]:
        raise ValueError(
            f"targets must be 1-D [B] with B = {outputs.shape[0]} (the batch size of the outputs), "
            f"got shape {tuple(targets.shape)}"
        )


# ---------------------------------------------------------------------------------------------
# Supervised loss
# ---------------------------------------------------------------------------------------------


def supervised_loss(outputs: Tensor, targets: Tensor, kind: TaskKind) -> Tensor:
    """Spec §4.4 / §15 #14: cross-entropy on logits [B, K] with long targets [B], or MAE (years) on outputs [B, 1] with float targets [B]."""
    _check_kind(kind)
    _check_2d("outputs", outputs)
    _check_targets(outputs, targets)
    if kind == "classification":
        if targets.is_floating_point() or targets.dtype == torch.bool:
            raise ValueError(
                f"classification targets must be integer class ids [B], got dtype {targets.dtype}; "
                "for age use kind='regression'"
            )
        return F.cross_entropy(outputs, targets)
    if outputs.shape[1] != 1:
        raise ValueError(
            f"regression outputs must be [B, 1] (one linear unit, spec §4.4), got shape {tuple(outputs.shape)}"
        )
    return F.l1_loss(outputs[:, 0], targets.to(outputs.dtype))


# ---------------------------------------------------------------------------------------------
# Standard KD for expressions: Hinton et al. 2015 (spec §6.1)
# ---------------------------------------------------------------------------------------------


def soft_target_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton et al. 2015, J Eq. 1-2: mean over the batch of CE(softmax(A_T/τ), softmax(A_S/τ)) = -Σ_k q_k log p_k, logits [B, K]."""
    if not (temperature > 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0 (the paper uses τ = 20), got {temperature!r}")
    _check_2d("student_logits", student_logits)
    _check_same_shape("student_logits", student_logits, "teacher_logits", teacher_logits)
    teacher_probs = F.softmax(teacher_logits.detach() / temperature, dim=1)
    # log_softmax, not log(softmax): at τ = 1 and confident logits softmax underflows to 0.
    student_log_probs = F.log_softmax(student_logits / temperature, dim=1)
    return -(teacher_probs * student_log_probs).sum(dim=1).mean()


def hinton_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    *,
    lam: float,
    temperature: float,
    tau_squared: bool = False,
) -> dict[str, Tensor]:
    """J Eq. 2: {"soft": λ·(τ²)·CE(N_T^τ, N_S^τ), "hard": (1-λ)·CE(y, N_S)}, logits [B, K], targets [B]."""
    # The printed formula has no τ²; Hinton's rescaling keeps the soft gradients' size independent
    # of τ, which at τ = 20 is a factor 400 (spec §15 #2), hence the switch.
    _check_lam(lam)
    soft = soft_target_cross_entropy(student_logits, teacher_logits, temperature)
    if tau_squared:
        soft = soft * temperature**2
    hard = supervised_loss(student_logits, targets, "classification")
    return {"soft": lam * soft, "hard": (1.0 - lam) * hard}


# ---------------------------------------------------------------------------------------------
# Standard KD for gender and age: FitNets-style hint (spec §6.2)
# ---------------------------------------------------------------------------------------------


def hint_l1_loss(student_embedding: Tensor, teacher_embedding: Tensor) -> Tensor:
    """FitNets (Romero et al. 2015), J Eq. 3: mean over batch and dims of |H_T - H_S|, embeddings [B, D]."""
    # Mean over dims too, not a sum: a 2048-d ResNet embedding would otherwise swamp the task
    # loss (spec §15 #21).
    _check_2d("student_embedding", student_embedding)
    _check_same_shape("student_embedding", student_embedding, "teacher_embedding", teacher_embedding)
    return F.l1_loss(student_embedding, teacher_embedding.detach())


def hint_kd_loss(
    student_outputs: Tensor,
    student_embedding: Tensor,
    teacher_embedding: Tensor,
    targets: Tensor,
    *,
    lam: float,
    kind: TaskKind,
) -> dict[str, Tensor]:
    """J Eq. 3: {"hint": λ·|H_T - H_S|_1, "supervised": (1-λ)·L(y, N_S)}, embeddings [B, D], outputs [B, K], targets [B]."""
    _check_lam(lam)
    if student_embedding.shape[0] != student_outputs.shape[0]:
        raise ValueError(
            f"student_embedding has batch size {student_embedding.shape[0]} but student_outputs has "
            f"{student_outputs.shape[0]}; both must come from the same images"
        )
    hint = hint_l1_loss(student_embedding, teacher_embedding)
    supervised = supervised_loss(student_outputs, targets, kind)
    return {"hint": lam * hint, "supervised": (1.0 - lam) * supervised}


# ---------------------------------------------------------------------------------------------
# Triplet loss across teacher and student (spec §6.3, §6.4)
# ---------------------------------------------------------------------------------------------


def triplet_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    *,
    margin: float,
    squared: bool = True,
    normalize: bool = True,
) -> Tensor:
    """J Eq. 4 (squared Euclidean) / C Eq. 3 (Euclidean): mean over the batch of max(0, d(a, p) - d(a, n) + α), embeddings [B, D].

    ``anchor`` = E_S(a′) and ``negative`` = E_S(n′) come from the student; ``positive`` = E_T(p) is
    the frozen teacher's full-face embedding and gets no gradient. ``normalize`` L2-normalises all
    three first, so that margins in [0, 0.5] mean the same for every network (spec §15 #20).

    Written by hand because ``torch.nn.functional.triplet_margin_with_distance_loss`` rejects
    margin 0, which is in J's margin grid, and adds an eps to the difference in its Euclidean
    distance, which shifts known values.
    """
    if not (margin >= 0.0 and math.isfinite(margin)):
        raise ValueError(f"margin must be a finite number >= 0 (J searches 0 to 0.5), got {margin!r}")
    _check_2d("anchor", anchor)
    _check_same_shape("anchor", anchor, "positive", positive)
    _check_same_shape("anchor", anchor, "negative", negative)
    positive = positive.detach()
    if normalize:
        anchor, positive, negative = (F.normalize(x, p=2.0, dim=1) for x in (anchor, positive, negative))
    dist_pos = (anchor - positive).pow(2).sum(dim=1)
    dist_neg = (anchor - negative).pow(2).sum(dim=1)
    if not squared:
        dist_pos = dist_pos.clamp_min(_SQRT_EPS).sqrt()
        dist_neg = dist_neg.clamp_min(_SQRT_EPS).sqrt()
    return F.relu(dist_pos - dist_neg + margin).mean()


def triplet_kd_loss(
    outputs: Tensor,
    targets: Tensor,
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    *,
    lam: float,
    margin: float,
    kind: TaskKind,
    squared: bool = True,
    normalize: bool = True,
    icpr_form: bool = False,
) -> dict[str, Tensor]:
    """J Eq. 5: {"supervised": (1-λ)·L(y, N_S), "triplet": λ·L_triplet}; C Eq. 4 (icpr_form): {"supervised": L, "triplet": λ·L_triplet}. Outputs [B, K] on the anchors, targets [B], embeddings [B, D]."""
    # The supervised term is on the anchors: they are the labelled occluded images (spec §6.4, §15 #22).
    _check_lam(lam)
    if anchor.shape[0] != outputs.shape[0]:
        raise ValueError(
            f"anchor has batch size {anchor.shape[0]} but outputs has {outputs.shape[0]}; "
            "outputs must be the student's outputs on the anchor images"
        )
    supervised = supervised_loss(outputs, targets, kind)
    triplet = triplet_loss(anchor, positive, negative, margin=margin, squared=squared, normalize=normalize)
    supervised_weight = 1.0 if icpr_form else 1.0 - lam
    return {"supervised": supervised_weight * supervised, "triplet": lam * triplet}


# ---------------------------------------------------------------------------------------------
# Teacher-free controls (occkd's own, not the papers': what a distilled stage gains without its teacher)
# ---------------------------------------------------------------------------------------------


def teacher_free_loss(
    outputs: Tensor,
    targets: Tensor,
    *,
    lam: float | None,
    kind: TaskKind,
    icpr_form: bool = False,
) -> dict[str, Tensor]:
    """A distilled objective with its teacher's terms removed: {"supervised": (1-λ)·L(y, N_S)} (J Eq. 2, 3, 5
    without the soft, hint and triplet terms), or L(y, N_S) in C Eq. 4's form (``icpr_form``) or where the
    stage has no λ. Outputs [B, K] (ages [B, 1]), targets [B]."""
    # The task term keeps the weight it has in the distilled run, so a plain-SGD step on it is the
    # distilled run's step minus the teacher's part (with Adam the scale hardly matters).
    if lam is not None:
        _check_lam(lam)
    weight = 1.0 if icpr_form or lam is None else 1.0 - lam
    return {"supervised": weight * supervised_loss(outputs, targets, kind)}
