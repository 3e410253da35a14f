"""Tests for occkd_core.fusion (spec §8, §15 #27-29) on small synthetic embeddings."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.compose import TransformedTargetRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, SVR, LinearSVC, LinearSVR

from occkd_core.fusion import (FUSION_C_GRID, LINEAR_SVM_SOLVERS, LINEAR_SVR_SOLVERS, build_fusion_model,
                               concat_embeddings, fit_fusion, fit_fusion_variants, fusion_variants, linear_solver)


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
    # 90 faces x 6 dims: more faces than dims, liblinear's primal (benchmarks/RESULTS.md §12)
    assert isinstance(svm, LinearSVC) and not svm.dual and svm.C == 0.1
    assert svm.coef_.shape == (3, 6)  # one-vs-rest: one hyperplane per class


def test_linear_solver_follows_the_shape_of_the_set() -> None:
    assert linear_solver("classification", 2650, 8192) == "liblinear_dual"  # gender at mid: more dims than faces
    assert linear_solver("classification", 25_057, 512) == "liblinear_primal"  # FER+
    assert linear_solver("regression", 2650, 8192) == "liblinear_dual"
    with pytest.raises(ValueError, match="valid solvers: liblinear_dual, liblinear_primal, libsvm"):
        build_fusion_model("classification", "linear", 1.0, 90, 6, solver="sgd")
    with pytest.raises(ValueError, match="always libsvm"):
        build_fusion_model("classification", "rbf", 1.0, 90, 6, solver="libsvm")


@pytest.mark.parametrize("solver", sorted(LINEAR_SVM_SOLVERS))
def test_every_linear_svm_solver_is_one_vs_rest(solver: str) -> None:
    """Spec §15 #27: one-vs-rest. With 4 classes one-vs-rest fits 4 binary machines, class k against the
    rest, where one-vs-one would fit 6 (one per pair): the count and the machines tell them apart."""
    rng = np.random.default_rng(3)
    centres = rng.normal(0.0, 4.0, (4, 5))
    train_y = np.repeat(np.arange(4), 25)
    train_x = centres[train_y] + rng.normal(0.0, 1.0, (100, 5))
    model = build_fusion_model("classification", "linear", 1.0, 100, 5, solver=solver).fit(train_x, train_y)
    svm = model[-1]
    if isinstance(svm, OneVsRestClassifier):
        assert len(svm.estimators_) == 4 and all(e.kernel == "linear" for e in svm.estimators_)
        # machine k is "class k vs the rest": the binary SVC fitted on (y == k)
        scaled = model[0].transform(train_x)
        for k, machine in enumerate(svm.estimators_):
            alone = SVC(C=1.0, kernel="linear").fit(scaled, (train_y == k).astype(int))
            np.testing.assert_allclose(machine.decision_function(scaled), alone.decision_function(scaled), atol=1e-6)
    else:
        assert isinstance(svm, LinearSVC) and svm.coef_.shape == (4, 5) and svm.multi_class == "ovr"
    assert model.decision_function(train_x).shape == (100, 4)
    assert np.mean(model.predict(train_x) == train_y) > 0.9


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


def test_linear_svr_variant_fits_a_linear_target_within_epsilon() -> None:
    """Spec §15 #28's other kernel: on a noise-free linear target a linear ε-SVR with large C is exact up
    to its ε-tube (0.1 years), where the RBF one above is off by up to 1.5; on either solver."""
    rng = np.random.default_rng(0)
    w = np.array([3.0, -2.0, 1.0, 0.5])
    train_x, val_x = rng.uniform(-1, 1, (120, 4)), rng.uniform(-1, 1, (60, 4))
    train_y, val_y = 40 + 10 * train_x @ w, 40 + 10 * val_x @ w
    result = fit_fusion(train_x, train_y, val_x, val_y, kind="regression", kernel="linear")
    assert isinstance(result.model[-1], TransformedTargetRegressor)
    assert isinstance(result.model[-1].regressor_, LinearSVR) and result.model[-1].regressor_.epsilon == 0.1
    assert -result.val_score < 0.1 + 1e-2
    libsvm = build_fusion_model("regression", "linear", 100.0, 120, 4, solver="libsvm").fit(train_x, train_y)
    assert isinstance(libsvm[-1], SVR) and libsvm[-1].kernel == "linear" and libsvm[-1].epsilon == 0.1
    assert np.mean(np.abs(libsvm.predict(val_x) - val_y)) < 0.1 + 1e-3


def test_liblinear_svr_matches_libsvm_svr_on_ages() -> None:
    """The two linear ε-SVR solvers fit the same model: liblinear's (targets centred, its intercept
    penalised) and libsvm's SVR(kernel="linear") (intercept free), on 600 faces aged 20-80 around 50."""
    rng = np.random.default_rng(0)
    num_dims = 8
    w = rng.normal(0.0, 12 / np.sqrt(num_dims), num_dims)
    train_x, val_x = rng.normal(0.0, 1.0, (600, num_dims)), rng.normal(0.0, 1.0, (300, num_dims))
    train_y = np.clip(50 + train_x @ w + rng.normal(0.0, 6.0, 600), 20, 80)
    val_y = np.clip(50 + val_x @ w + rng.normal(0.0, 6.0, 300), 20, 80)
    assert 45 < train_y.mean() < 55 and train_y.std() > 10
    for C in (0.1, 1.0, 10.0):
        liblinear, libsvm = (build_fusion_model("regression", "linear", C, 600, num_dims, solver=solver)
                             .fit(train_x, train_y) for solver in ("liblinear_dual", "libsvm"))
        intercept = liblinear[-1].regressor_.intercept_[0] + liblinear[-1].transformer_.mean_[0]
        assert intercept == pytest.approx(libsvm[-1].intercept_[0], abs=0.05)
        ours, reference = liblinear.predict(val_x), libsvm.predict(val_x)
        assert np.max(np.abs(ours - reference)) < 0.2  # years, against predictions spread over ~50
        assert np.mean(np.abs(ours - val_y)) == pytest.approx(np.mean(np.abs(reference - val_y)), abs=0.01)
        if C == 0.1:
            # liblinear on raw years, as before: its penalised intercept is pulled years towards 0
            raw = make_pipeline(StandardScaler(), LinearSVR(C=C, epsilon=0.1, dual=True, random_state=0))
            raw.fit(train_x, train_y)
            assert libsvm[-1].intercept_[0] - raw[-1].intercept_[0] > 5.0
            assert np.mean(np.abs(raw.predict(val_x) - val_y)) > np.mean(np.abs(reference - val_y)) + 1.0


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


def test_a_fit_stopped_at_the_iteration_cap_is_recorded(monkeypatch) -> None:
    import occkd_core.fusion as fusion

    train_x, train_y, val_x, val_y = blobs(4)
    assert all(fit_fusion(train_x, train_y, val_x, val_y, kind="classification", Cs=(0.1, 1.0)).converged.values())
    monkeypatch.setattr(fusion, "_LIBLINEAR_MAX_ITER", 1)  # one Newton step cannot reach liblinear's tolerance
    for jobs in (1, 2):  # read from each fitted model, not from warnings (process-wide, and fits run in threads)
        with pytest.warns(ConvergenceWarning, match=r"iteration cap at C = 1 \(1\) on 90 x 6 features"):
            result = fit_fusion(train_x, train_y, val_x, val_y, kind="classification", Cs=(0.1, 1.0), jobs=jobs)
        assert result.converged == {0.1: False, 1.0: False}
    ages = np.linspace(20.0, 80.0, 90)
    features = np.c_[ages / 10.0, np.cos(ages)]
    with pytest.warns(ConvergenceWarning, match="regression model stopped"):  # LinearSVR, inside its target centring
        result = fit_fusion(features, ages, features, ages, kind="regression", kernel="linear", Cs=(1.0,))
    assert result.converged == {1.0: False}


def embeddings_of(students: dict[str, int], splits: dict[str, np.ndarray], seed: int = 0) -> dict:
    """Each student's embedding of each split: its labels' one-hot codes, scaled, plus noise, in 4 dims."""
    rng = np.random.default_rng(seed)
    return {name: {split: np.eye(4)[labels % 4] * strength + rng.normal(0.0, 1.0, (len(labels), 4))
                   for split, labels in splits.items()} for name, strength in students.items()}


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_variants_fitted_on_threads_are_the_models_fitted_one_by_one(kind, monkeypatch) -> None:
    import threading

    import occkd_core.fusion as fusion

    rng = np.random.default_rng(1)
    labels = {split: rng.integers(0, 3, n) for split, n in (("train", 120), ("val", 60), ("test", 60))}
    if kind == "regression":
        labels = {split: 20.0 + 10.0 * y + rng.normal(0.0, 1.0, len(y)) for split, y in labels.items()}
    codes = {split: np.rint((y - 20.0) / 10.0).astype(int) if kind == "regression" else y
             for split, y in labels.items()}
    embeddings = embeddings_of({"standard_kd": 2, "triplet_kd": 1, "standard_kd_control": 2,
                                "triplet_kd_control": 1, "student": 1}, codes)
    variants = fusion_variants(["standard_kd", "triplet_kd"], controls=["standard_kd_control", "triplet_kd_control"],
                               student="student")
    threads: set[str] = set()
    fit_one = fusion._fit_one

    def recording(task):
        threads.add(threading.current_thread().name)
        return fit_one(task)

    monkeypatch.setattr(fusion, "_fit_one", recording)
    outputs = 1 if kind == "regression" else 3
    one = fit_fusion_variants(embeddings, labels, variants, kind=kind, num_outputs=outputs, Cs=(0.1, 1.0, 10.0))
    assert threads == {threading.current_thread().name}
    threads.clear()
    two = fit_fusion_variants(embeddings, labels, variants, kind=kind, num_outputs=outputs, Cs=(0.1, 1.0, 10.0),
                              jobs=2)
    assert len(threads) == 2 and threading.current_thread().name not in threads
    assert [m.variant for m in two] == [m.variant for m in one] == variants
    for a, b in zip(one, two):
        # Each variant's fits, queued largest first among all variants', come back to it: the same as fitting it alone.
        own = {split: concat_embeddings(*(embeddings[m][split] for m in a.variant.members)) for split in ("train", "val")}
        alone = fit_fusion(own["train"], labels["train"], own["val"], labels["val"], kind=kind, Cs=(0.1, 1.0, 10.0),
                           kernel=a.variant.kernel)
        assert (a.fit.C, a.fit.val_score, a.fit.val_scores, a.fit.converged) == (
            b.fit.C, b.fit.val_score, b.fit.val_scores, b.fit.converged) == (
            alone.C, alone.val_score, alone.val_scores, alone.converged)
        np.testing.assert_array_equal(a.outputs["test"], b.outputs["test"])
    assert len({m.fit.val_score for m in one}) > 1  # the variants differ, so a mix-up between them would show
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        fit_fusion_variants(embeddings, labels, variants, kind=kind, num_outputs=outputs, jobs=0)
