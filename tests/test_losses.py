"""Known-value tests for occkd_core.losses (spec §4.4, §6). Every expected number is worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from occkd_core.losses import (
    hint_kd_loss,
    hint_l1_loss,
    hinton_kd_loss,
    soft_target_cross_entropy,
    supervised_loss,
    triplet_kd_loss,
    triplet_loss,
)

LN2, LN3, LN5 = math.log(2.0), math.log(3.0), math.log(5.0)


def close(value: torch.Tensor, expected: float) -> bool:
    return math.isclose(value.item(), expected, rel_tol=1e-5, abs_tol=1e-6)


# Logits chosen so that the softmaxes are simple fractions:
#   softmax([0, ln 2, 0]) = [1, 2, 1] / 4        softmax([ln 3, 0, 0]) = [3, 1, 1] / 5
CLS_LOGITS = torch.tensor([[0.0, LN2, 0.0], [LN3, 0.0, 0.0]])
CLS_TARGETS = torch.tensor([1, 0])
# CE row 0 = -ln(1/2) = ln 2; row 1 = -ln(3/5) = ln(5/3); mean = (ln 2 + ln(5/3)) / 2 = ln(10/3) / 2
CLS_CE = math.log(10.0 / 3.0) / 2.0

AGE_OUTPUTS = torch.tensor([[20.0], [31.0]])
AGE_TARGETS = torch.tensor([22.0, 30.0])
AGE_MAE = 1.5  # (|20 - 22| + |31 - 30|) / 2 = (2 + 1) / 2


# ---------------------------------------------------------------------------------------------
# supervised_loss
# ---------------------------------------------------------------------------------------------


def test_supervised_loss_classification_is_cross_entropy() -> None:
    assert close(supervised_loss(CLS_LOGITS, CLS_TARGETS, "classification"), CLS_CE)


def test_supervised_loss_regression_is_mae() -> None:
    assert close(supervised_loss(AGE_OUTPUTS, AGE_TARGETS, "regression"), AGE_MAE)


def test_supervised_loss_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="task kind"):
        supervised_loss(CLS_LOGITS, CLS_TARGETS, "ranking")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="integer class ids"):
        supervised_loss(CLS_LOGITS, CLS_TARGETS.float(), "classification")
    with pytest.raises(ValueError, match=r"\[B, 1\]"):
        supervised_loss(CLS_LOGITS, AGE_TARGETS, "regression")
    with pytest.raises(ValueError, match="B = 2"):
        supervised_loss(CLS_LOGITS, torch.tensor([0, 1, 2]), "classification")


# ---------------------------------------------------------------------------------------------
# Hinton KD
# ---------------------------------------------------------------------------------------------

# At τ = 2: teacher [0, 2 ln 2, 0] / 2 -> q = [1/4, 1/2, 1/4];  student [2 ln 3, 0, 0] / 2 -> p = [3/5, 1/5, 1/5]
#   CE row 0 = -(1/4 ln(3/5) + 1/2 ln(1/5) + 1/4 ln(1/5)) = ln 5 - ln 3 / 4
# teacher [0, 0, 0] -> q = [1/3, 1/3, 1/3];  student [0, 2 ln 2, 0] / 2 -> p = [1/4, 1/2, 1/4]
#   CE row 1 = -(1/3)(ln(1/4) + ln(1/2) + ln(1/4)) = (1/3)(2 ln 2 + ln 2 + 2 ln 2) = 5 ln 2 / 3
KD_TEACHER = torch.tensor([[0.0, 2 * LN2, 0.0], [0.0, 0.0, 0.0]])
KD_STUDENT = torch.tensor([[2 * LN3, 0.0, 0.0], [0.0, 2 * LN2, 0.0]])
KD_SOFT_CE = ((LN5 - LN3 / 4) + 5 * LN2 / 3) / 2  # = 1.24502...
# Hard CE at τ = 1 on the student logits, targets [1, 0]:
#   softmax([2 ln 3, 0, 0]) = [9, 1, 1] / 11 -> -ln(1/11) = ln 11
#   softmax([0, 2 ln 2, 0]) = [1, 4, 1] / 6  -> -ln(1/6)  = ln 6
KD_TARGETS = torch.tensor([1, 0])
KD_HARD_CE = (math.log(11.0) + math.log(6.0)) / 2


def test_soft_target_cross_entropy_known_value() -> None:
    assert close(soft_target_cross_entropy(KD_STUDENT, KD_TEACHER, temperature=2.0), KD_SOFT_CE)


def test_soft_target_cross_entropy_gives_no_gradient_to_teacher() -> None:
    teacher = KD_TEACHER.clone().requires_grad_(True)
    student = KD_STUDENT.clone().requires_grad_(True)
    soft_target_cross_entropy(student, teacher, temperature=2.0).backward()
    assert teacher.grad is None
    # d CE / d A_S = (p - q) / (τ B): row 0 = ([3/5, 1/5, 1/5] - [1/4, 1/2, 1/4]) / 4 = [0.0875, -0.075, -0.0125]
    assert torch.allclose(student.grad[0], torch.tensor([0.0875, -0.075, -0.0125]), atol=1e-6)


def test_hinton_kd_loss_known_terms() -> None:
    terms = hinton_kd_loss(KD_STUDENT, KD_TEACHER, KD_TARGETS, lam=0.7, temperature=2.0)
    assert set(terms) == {"soft", "hard"}
    assert close(terms["soft"], 0.7 * KD_SOFT_CE)  # 0.7 * 1.24502 = 0.87151
    assert close(terms["hard"], 0.3 * KD_HARD_CE)  # 0.3 * ln(66) / 2 = 0.62845


def test_hinton_kd_tau_squared_scales_soft_term_exactly() -> None:
    plain = hinton_kd_loss(KD_STUDENT, KD_TEACHER, KD_TARGETS, lam=0.7, temperature=2.0)
    scaled = hinton_kd_loss(KD_STUDENT, KD_TEACHER, KD_TARGETS, lam=0.7, temperature=2.0, tau_squared=True)
    assert close(scaled["soft"], 4.0 * plain["soft"].item())  # τ² = 2² = 4
    assert torch.equal(scaled["hard"], plain["hard"])


@pytest.mark.parametrize("lam", [-0.1, 1.5, float("nan")])
def test_hinton_kd_rejects_bad_lambda(lam: float) -> None:
    with pytest.raises(ValueError, match="lam must be in"):
        hinton_kd_loss(KD_STUDENT, KD_TEACHER, KD_TARGETS, lam=lam, temperature=2.0)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("inf")])
def test_soft_target_rejects_bad_temperature(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        soft_target_cross_entropy(KD_STUDENT, KD_TEACHER, temperature)


def test_soft_target_rejects_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="same shape"):
        soft_target_cross_entropy(KD_STUDENT, KD_TEACHER[:, :2], 2.0)


# ---------------------------------------------------------------------------------------------
# Hint (FitNets) loss
# ---------------------------------------------------------------------------------------------

HINT_STUDENT = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
HINT_TEACHER = torch.tensor([[1.0, 0.0, 1.0], [1.0, -1.0, 2.0]])
# |H_T - H_S| = [[0, 2, 2], [1, 1, 2]]: sum 8 over 6 entries -> 4/3 (mean over batch AND dims)
HINT_L1 = 4.0 / 3.0


def test_hint_l1_loss_known_value_and_teacher_detached() -> None:
    teacher = HINT_TEACHER.clone().requires_grad_(True)
    student = HINT_STUDENT.clone().requires_grad_(True)
    loss = hint_l1_loss(student, teacher)
    assert close(loss, HINT_L1)
    loss.backward()
    assert teacher.grad is None
    # d/dH_S of mean |H_S - H_T| = sign(H_S - H_T) / 6; sign at 0 is 0
    expected = torch.tensor([[0.0, 1.0, 1.0], [-1.0, 1.0, -1.0]]) / 6
    assert torch.allclose(student.grad, expected)


def test_hint_kd_loss_known_terms() -> None:
    terms = hint_kd_loss(AGE_OUTPUTS, HINT_STUDENT, HINT_TEACHER, AGE_TARGETS, lam=0.3, kind="regression")
    assert set(terms) == {"hint", "supervised"}
    assert close(terms["hint"], 0.4)  # 0.3 * 4/3
    assert close(terms["supervised"], 1.05)  # 0.7 * 1.5


def test_hint_kd_loss_rejects_mismatched_batches() -> None:
    with pytest.raises(ValueError, match="same shape"):
        hint_l1_loss(HINT_STUDENT, HINT_TEACHER[:1])
    with pytest.raises(ValueError, match="batch size"):
        hint_kd_loss(AGE_OUTPUTS[:1], HINT_STUDENT, HINT_TEACHER, AGE_TARGETS[:1], lam=0.3, kind="regression")


# ---------------------------------------------------------------------------------------------
# Triplet loss
# ---------------------------------------------------------------------------------------------

# Row 0: a = [0,0,0], p = [1,0,0], n = [0,2,0]: d²(a,p) = 1, d²(a,n) = 4
#   squared:  max(0, 1 - 4 + 0.5) = 0      plain: max(0, 1 - 2 + 0.5) = 0   (hinge inactive)
# Row 1: a = [1,1,0], p = [1,1,2], n = [1,1,1]: d²(a,p) = 4, d²(a,n) = 1
#   squared:  max(0, 4 - 1 + 0.5) = 3.5    plain: max(0, 2 - 1 + 0.5) = 1.5
TRI_A = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
TRI_P = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 2.0]])
TRI_N = torch.tensor([[0.0, 2.0, 0.0], [1.0, 1.0, 1.0]])


def test_triplet_loss_squared_and_plain_known_values() -> None:
    squared = triplet_loss(TRI_A, TRI_P, TRI_N, margin=0.5, squared=True, normalize=False)
    plain = triplet_loss(TRI_A, TRI_P, TRI_N, margin=0.5, squared=False, normalize=False)
    assert close(squared, 1.75)  # (0 + 3.5) / 2
    assert close(plain, 0.75)  # (0 + 1.5) / 2


def test_triplet_hinge_is_zero_when_positive_is_closer_by_the_margin() -> None:
    # Row 0 alone: d(a,p) + α = 1 + 0.5 < 4 = d(a,n), so the loss and its gradients are zero.
    anchor = TRI_A[:1].clone().requires_grad_(True)
    negative = TRI_N[:1].clone().requires_grad_(True)
    loss = triplet_loss(anchor, TRI_P[:1], negative, margin=0.5, normalize=False)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(anchor.grad) == 0 and torch.count_nonzero(negative.grad) == 0


def test_triplet_loss_gradients_skip_positive() -> None:
    anchor = TRI_A.clone().requires_grad_(True)
    positive = TRI_P.clone().requires_grad_(True)
    negative = TRI_N.clone().requires_grad_(True)
    triplet_loss(anchor, positive, negative, margin=0.5, squared=True, normalize=False).backward()
    assert positive.grad is None
    # Only row 1 is active; L = (1/2)(|a-p|² - |a-n|² + α):
    #   dL/da = (1/2)(2(a-p) - 2(a-n)) = n - p = [0, 0, -1];  dL/dn = (1/2)(2(a-n)) = a - n = [0, 0, -1]
    assert torch.equal(anchor.grad, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0]]))
    assert torch.equal(negative.grad, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0]]))


def test_triplet_loss_normalize_switch() -> None:
    # Row 0: a = [2,0,0], p = [0,3,0], n = [7,0,0]
    #   normalised: [1,0,0], [0,1,0], [1,0,0] -> d²(a,p) = 2, d²(a,n) = 0 -> 2 - 0 + 0.1 = 2.1
    #   raw:        d²(a,p) = 4 + 9 = 13, d²(a,n) = 25                  -> 13 - 25 + 0.1 < 0 -> 0
    # Row 1: a = [0,1,0], p = [0,4,0], n = [0,0,2]
    #   normalised: [0,1,0], [0,1,0], [0,0,1] -> d²(a,p) = 0, d²(a,n) = 2 -> 0 - 2 + 0.1 < 0 -> 0
    #   raw:        d²(a,p) = 9, d²(a,n) = 1 + 4 = 5                    -> 9 - 5 + 0.1 = 4.1
    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    p = torch.tensor([[0.0, 3.0, 0.0], [0.0, 4.0, 0.0]])
    n = torch.tensor([[7.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    assert close(triplet_loss(a, p, n, margin=0.1, normalize=True), 1.05)  # (2.1 + 0) / 2
    assert close(triplet_loss(a, p, n, margin=0.1, normalize=False), 2.05)  # (0 + 4.1) / 2


def test_plain_triplet_loss_has_finite_gradient_at_zero_distance() -> None:
    anchor = torch.ones(2, 3, requires_grad=True)
    negative = torch.ones(2, 3, requires_grad=True)
    loss = triplet_loss(anchor, torch.ones(2, 3), negative, margin=0.1, squared=False, normalize=False)
    assert close(loss, 0.1)  # 0 - 0 + 0.1 (up to the 1e-6 floor under the square root, which cancels)
    loss.backward()
    assert torch.isfinite(anchor.grad).all() and torch.isfinite(negative.grad).all()


def test_triplet_loss_margin_zero_is_allowed_and_negative_rejected() -> None:
    assert close(triplet_loss(TRI_A, TRI_P, TRI_N, margin=0.0, normalize=False), 1.5)  # (0 + (4 - 1)) / 2
    with pytest.raises(ValueError, match="margin"):
        triplet_loss(TRI_A, TRI_P, TRI_N, margin=-0.1)
    with pytest.raises(ValueError, match="same shape"):
        triplet_loss(TRI_A, TRI_P[:1], TRI_N, margin=0.1)


def test_triplet_kd_loss_journal_and_icpr_forms() -> None:
    journal = triplet_kd_loss(
        CLS_LOGITS, CLS_TARGETS, TRI_A, TRI_P, TRI_N, lam=0.4, margin=0.5, kind="classification", normalize=False
    )
    assert set(journal) == {"supervised", "triplet"}
    assert close(journal["supervised"], 0.6 * CLS_CE)  # (1 - 0.4) * ln(10/3)/2
    assert close(journal["triplet"], 0.4 * 1.75)  # 0.4 * 1.75 = 0.7
    icpr = triplet_kd_loss(
        CLS_LOGITS, CLS_TARGETS, TRI_A, TRI_P, TRI_N, lam=0.5, margin=0.5, kind="classification",
        squared=False, normalize=False, icpr_form=True,
    )
    assert close(icpr["supervised"], CLS_CE)  # no (1 - λ) factor in C Eq. 4
    assert close(icpr["triplet"], 0.5 * 0.75)  # λ · plain-Euclidean loss


def test_triplet_kd_loss_regression_and_bad_input() -> None:
    terms = triplet_kd_loss(AGE_OUTPUTS, AGE_TARGETS, TRI_A, TRI_P, TRI_N, lam=0.7, margin=0.5, kind="regression",
                            normalize=False)
    assert close(terms["supervised"], 0.3 * AGE_MAE)  # 0.3 * 1.5 = 0.45
    assert close(terms["triplet"], 0.7 * 1.75)  # 1.225
    with pytest.raises(ValueError, match="lam must be in"):
        triplet_kd_loss(AGE_OUTPUTS, AGE_TARGETS, TRI_A, TRI_P, TRI_N, lam=2.0, margin=0.5, kind="regression")
    with pytest.raises(ValueError, match="outputs on the anchor"):
        triplet_kd_loss(AGE_OUTPUTS[:1], AGE_TARGETS[:1], TRI_A, TRI_P, TRI_N, lam=0.5, margin=0.5, kind="regression")
