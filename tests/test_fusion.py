"""Tests for occkd_core.fusion (spec §8, §15 #27-29) on small synthetic embeddings."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, SVR, LinearSVC, LinearSVR

from occkd_core.fusion import FUSION_C_GRID, concat_embeddings, fit_fusion


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Three well-separated classes in 6-D (centres ~5 apart, spread 0.5): 90 train, 60 val."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 5.0, (3, 6))
    train_y, val_y = np.repeat(np.arange(3), 30), np.repeat(np.arange(3), 20)
    train_x = centres[train_y] + rng.normal(0.0, 0.5, (90, 6))
    val_x = centres[val_y] + rng.normal(0.0, 0.5, (60, 6))
    return train_x, train_y, val_x, val_y


def test_concat_embeddings() -> None:
    a = np.arange(6.0).reshape(2, 3)
    b = np.array([[10.0], [20.0]])
    assert concat_embeddings(a, b).tolist() == [[0.0, 1.0, 2.0, 10.0], [3.0, 4.0, 5.0, 20.0]]
    assert concat_embeddings(a).shape == (2, 3)  # a single embedding (J Table 4 ablation)
    with pytest.raises(ValueError, match=r"different numbers of images \[2, 3\]"):
        concat_embeddings(a, np.zeros((3, 1)))


def test_classification_on_separable_features_ties_go_to_smallest_C() -> None:
    train_x, train_y, val_x, val_y = blobs()
    result = fit_fusion(train_x, train_y, val_x, val_y, kind="classification")
    assert set(result.val_scores) == set(FUSION_C_GRID)
    # Every C separates the blobs: accuracy 1.0 everywhere, so the tie goes to the smallest C.
    assert all(score == 1.0 for score in result.val_scores.values())
    assert result.C == 0.1 and result.val_score == 1.0
    assert np.array_equal(result.predict(val_x), val_y)
    scaler, svm = result.model[0], result.model[-1]
    assert isinstance(scaler, StandardScaler)
    # A small set is fitted by libsvm's linear SVC (liblinear is far slower on weakly separable data).
    assert isinstance(svm, SVC) and svm.kernel == "linear" and svm.C == 0.1


def test_large_sets_use_liblinear_one_vs_rest(monkeypatch) -> None:
    import occkd_core.fusion as fusion

    monkeypatch.setattr(fusion, "_LIBSVM_BELOW", 10)
    train_x, train_y, val_x, val_y = blobs()
    result = fit_fusion(train_x, train_y, val_x, val_y, kind="classification", Cs=(1.0,))
    svm = result.model[-1]
    assert isinstance(svm, LinearSVC) and svm.coef_.shape == (3, 6)  # one-vs-rest: one hyperplane per class


def test_classification_with_rbf_kernel_uses_svc() -> None:
    train_x, train_y, val_x, val_y = blobs(1)
    result = fit_fusion(train_x, train_y, val_x, val_y, kind="classification", Cs=(1.0,), kernel="rbf")
    assert isinstance(result.model[-1], SVC) and result.val_score == 1.0


def test_regression_on_linear_target_has_small_mae() -> None:
    # y = 40 + 10·x·w with |y - 40| up to 65: SVR's dual coefficients are bounded by C, so a small C
    # cannot reach the target range and a large C fits well.
    rng = np.random.default_rng(0)
    w = np.array([3.0, -2.0, 1.0, 0.5])
    train_x, val_x = rng.uniform(-1, 1, (120, 4)), rng.uniform(-1, 1, (60, 4))
    train_y, val_y = 40 + 10 * train_x @ w, 40 + 10 * val_x @ w
    result = fit_fusion(train_x, train_y, val_x, val_y, kind="regression")
    svr = result.model[-1]
    assert isinstance(svr, SVR) and svr.kernel == "rbf" and svr.epsilon == 0.1 and svr.gamma == "scale"
    assert result.C == 1000.0 and svr.C == 1000.0
    assert -result.val_score < 1.5  # MAE in "years" against a target spread of about ±65
    assert result.val_scores[0.1] < -10.0  # C = 0.1 underfits badly
    # val_score is -MAE of the kept model on the validation features
    assert result.val_score == pytest.approx(-np.mean(np.abs(result.predict(val_x) - val_y)))


def test_linear_svr_variant_fits_a_linear_target_within_epsilon(monkeypatch) -> None:
    """Spec §15 #28's other kernel: on a noise-free linear target a linear ε-SVR with large C is exact up
    to its ε-tube (0.1 years), where the RBF one above is off by up to 1.5; large sets use liblinear."""
    import occkd_core.fusion as fusion

    rng = np.random.default_rng(0)
    w = np.array([3.0, -2.0, 1.0, 0.5])
    train_x, val_x = rng.uniform(-1, 1, (120, 4)), rng.uniform(-1, 1, (60, 4))
    train_y, val_y = 40 + 10 * train_x @ w, 40 + 10 * val_x @ w
    result = fit_fusion(train_x, train_y, val_x, val_y, kind="regression", kernel="linear")
    svr = result.model[-1]
    assert isinstance(svr, SVR) and svr.kernel == "linear" and svr.epsilon == 0.1
    assert -result.val_score < 0.1 + 1e-3
    monkeypatch.setattr(fusion, "_LIBSVM_BELOW", 10)
    large = fit_fusion(train_x, train_y, val_x, val_y, kind="regression", kernel="linear", Cs=(100.0,))
    assert isinstance(large.model[-1], LinearSVR) and large.model[-1].epsilon == 0.1
    assert -large.val_score < 0.1 + 1e-2


def test_validation_picks_a_middle_C() -> None:
    # Noisy training targets (sd 6) and clean validation targets: a large C fits the training noise,
    # a small C underfits; with this seed validation MAE is lowest at C = 10 (about 2.3, against
    # 3.5 at C = 1 and 4.3 at C = 100).
    rng = np.random.default_rng(2)
    train_x, val_x = rng.uniform(-1, 1, (40, 5)), rng.uniform(-1, 1, (40, 5))
    train_y = 40 + 10 * train_x[:, 0] + rng.normal(0.0, 6.0, 40)
    val_y = 40 + 10 * val_x[:, 0]
    result = fit_fusion(train_x, train_y, val_x, val_y, kind="regression")
    assert result.C == max(result.val_scores, key=result.val_scores.get)
    assert result.C == 10.0 and result.model[-1].C == 10.0
    assert result.val_scores[10.0] > result.val_scores[1.0] + 0.5
    assert result.val_scores[10.0] > result.val_scores[100.0] + 0.5


def test_fit_fusion_rejects_bad_input() -> None:
    train_x, train_y, val_x, val_y = blobs()
    with pytest.raises(ValueError, match="90 entries"):
        fit_fusion(train_x, train_y[:-1], val_x, val_y, kind="classification")
    with pytest.raises(ValueError, match="5 dims but train_features have 6"):
        fit_fusion(train_x, train_y, val_x[:, :5], val_y, kind="classification")
    bad = train_x.copy()
    bad[[3, 7], 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf in 2 of 90 rows \(first: row 3\)"):
        fit_fusion(bad, train_y, val_x, val_y, kind="classification")
    with pytest.raises(ValueError, match="integer class ids"):
        fit_fusion(train_x, train_y + 0.5, val_x, val_y, kind="classification")
    with pytest.raises(ValueError, match="single class"):
        fit_fusion(train_x, np.zeros(90, dtype=int), val_x, val_y, kind="classification")
    with pytest.raises(ValueError, match="valid kernels"):
        fit_fusion(train_x, train_y, val_x, val_y, kind="classification", kernel="cubic")
    with pytest.raises(ValueError, match="valid kinds"):
        fit_fusion(train_x, train_y, val_x, val_y, kind="ranking")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Cs must be"):
        fit_fusion(train_x, train_y, val_x, val_y, kind="classification", Cs=(0.0, 1.0))
