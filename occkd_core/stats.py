"""Paired significance tests against the undistilled student (spec §12, §15 #30).

* McNemar (Dietterich 1998) on per-sample correctness, for expressions and gender: the daggers.
* Holm's correction when one baseline is tested against several models at once.
* Wilcoxon signed-rank on per-sample absolute errors, for age, where the papers report no test.
* :func:`judge_comparisons`: both readings of a family of tests side by side, the papers' rule
  (uncorrected p < α, † where the model is also better) and the Holm-corrected verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import wilcoxon
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

#: Below this many discordant pairs (b + c) the chi-square approximation is poor: use the exact
#: binomial test (spec §15 #30).
MCNEMAR_EXACT_BELOW = 25


def _check_alpha(alpha: float) -> None:
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def _check_paired(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"{name_a} and {name_b} must be 1-D (one value per test sample), got shapes {a.shape} and {b.shape}")
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} has {a.shape[0]} samples but {name_b} has {b.shape[0]}; "
            "both must be per-sample results on the same test set, in the same order"
        )
    if a.shape[0] == 0:
        raise ValueError(f"{name_a} and {name_b} are empty; a paired test needs at least one sample")


@dataclass(frozen=True)
class McNemarResult:
    """Outcome of a paired McNemar test of a model against a baseline."""

    b: int  # samples the model gets right and the baseline wrong
    c: int  # samples the baseline gets right and the model wrong
    statistic: float  # exact: min(b, c) (statsmodels' convention); else (|b - c| - 1)² / (b + c)
    pvalue: float
    exact: bool  # exact binomial test (b + c < 25) rather than chi-square
    alpha: float

    @property
    def significant(self) -> bool:
        """The two-sided test rejects equal error rates at level ``alpha``."""
        return self.pvalue < self.alpha

    @property
    def improved(self) -> bool:
        """The model wins more of the discordant pairs than the baseline."""
        return self.b > self.c

    @property
    def significant_improvement(self) -> bool:
        """What a dagger (†) in the papers' tables marks."""
        return self.significant and self.improved


def mcnemar_test(correct_model: np.ndarray, correct_baseline: np.ndarray, *, alpha: float = 0.05) -> McNemarResult:
    """Paired McNemar test (Dietterich 1998, spec §12) on per-sample correctness, bool [N] each."""
    _check_alpha(alpha)
    correct_model = np.asarray(correct_model)
    correct_baseline = np.asarray(correct_baseline)
    for name, array in (("correct_model", correct_model), ("correct_baseline", correct_baseline)):
        if array.dtype != np.bool_:
            raise ValueError(
                f"{name} must be a bool array (is each test sample classified correctly?), got dtype {array.dtype}; "
                "pass predictions == labels"
            )
    _check_paired("correct_model", correct_model, "correct_baseline", correct_baseline)
    b = int(np.sum(correct_model & ~correct_baseline))
    c = int(np.sum(~correct_model & correct_baseline))
    both_right = int(np.sum(correct_model & correct_baseline))
    both_wrong = int(np.sum(~correct_model & ~correct_baseline))
    exact = b + c < MCNEMAR_EXACT_BELOW
    # Row = model right / wrong, column = baseline right / wrong: b and c are the off-diagonal cells.
    table = np.array([[both_right, b], [c, both_wrong]])
    result = mcnemar(table, exact=exact, correction=True)
    return McNemarResult(
        b=b, c=c, statistic=float(result.statistic), pvalue=float(result.pvalue), exact=exact, alpha=alpha
    )


def holm_correction(pvalues: Sequence[float], alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Holm-Bonferroni step-down correction: (reject bool [m], adjusted p-values [m]) in the input order."""
    _check_alpha(alpha)
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"pvalues must be a non-empty 1-D sequence, got shape {p.shape}")
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"pvalues must lie in [0, 1], got {p.tolist()}")
    reject, adjusted, _, _ = multipletests(p, alpha=alpha, method="holm")
    return reject.astype(bool), adjusted


@dataclass(frozen=True)
class WilcoxonResult:
    """Outcome of a two-sided Wilcoxon signed-rank test on paired absolute errors."""

    statistic: float  # scipy's two-sided statistic: the smaller of the signed-rank sums
    pvalue: float
    median_difference: float  # median of (model error − baseline error): negative = the model is better
    num_pairs: int  # all pairs, including those with zero difference (which the test drops)


def wilcoxon_test(abs_errors_model: np.ndarray, abs_errors_baseline: np.ndarray) -> WilcoxonResult:
    """Two-sided Wilcoxon signed-rank test (scipy, zero differences dropped) on paired absolute errors [N], e.g. |age error| in years."""
    model = np.asarray(abs_errors_model, dtype=float)
    baseline = np.asarray(abs_errors_baseline, dtype=float)
    _check_paired("abs_errors_model", model, "abs_errors_baseline", baseline)
    for name, array in (("abs_errors_model", model), ("abs_errors_baseline", baseline)):
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains NaN or inf")
        if np.any(array < 0):
            raise ValueError(
                f"{name} has negative values (min {array.min()}); pass absolute errors |prediction - target|"
            )
    differences = model - baseline
    median_difference = float(np.median(differences))
    if not np.any(differences):
        # scipy has no ranks to work with here (and warns or raises, by version): identical errors
        # on every sample are no evidence of a difference.
        return WilcoxonResult(statistic=0.0, pvalue=1.0, median_difference=median_difference, num_pairs=model.size)
    result = wilcoxon(differences, zero_method="wilcox", alternative="two-sided")
    return WilcoxonResult(
        statistic=float(result.statistic),
        pvalue=float(result.pvalue),
        median_difference=median_difference,
        num_pairs=model.size,
    )


#: What a verdict says of a model against its baseline.
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no significant difference"


@dataclass(frozen=True)
class Verdict:
    """One comparison of a family judged both ways (spec §12)."""

    pvalue: float  # the test's own p-value
    improved: bool  # the model's metric is better than the baseline's
    significant: bool  # the papers' rule: p < α, no correction for the number of comparisons
    pvalue_holm: float  # Holm-adjusted over the family
    significant_holm: bool

    @property
    def dagger(self) -> bool:
        """The papers' † (significant improvement, uncorrected)."""
        return self.significant and self.improved

    @property
    def verdict(self) -> str:
        """The papers' rule in words: better / worse / no significant difference."""
        return _words(self.significant, self.improved)

    @property
    def verdict_holm(self) -> str:
        return _words(self.significant_holm, self.improved)


def _words(significant: bool, improved: bool) -> str:
    return (BETTER if improved else WORSE) if significant else NO_DIFFERENCE


def judge_comparisons(pvalues: Sequence[float], improved: Sequence[bool], *, alpha: float = 0.05) -> list[Verdict]:
    """Verdicts for a family of comparisons against one baseline, in input order: each p-value read by the
    papers' rule (uncorrected, p < ``alpha``) and after Holm's correction over the whole family."""
    if len(pvalues) != len(improved):
        raise ValueError(f"got {len(pvalues)} p-values but {len(improved)} improved flags; pass one per comparison")
    reject, adjusted = holm_correction(pvalues, alpha=alpha)
    return [Verdict(pvalue=float(p), improved=bool(better), significant=bool(p < alpha),
                    pvalue_holm=float(adj), significant_holm=bool(rej))
            for p, better, rej, adj in zip(pvalues, improved, reject, adjusted)]


@dataclass(frozen=True)
class Comparison:
    """One model against its baseline on the same test faces, by the task's paired test (spec §12)."""

    test: str  # "mcnemar" (classification: per-sample correctness) | "wilcoxon" (regression: absolute errors)
    metric: str  # "accuracy" (%) | "mae"
    model_value: float
    baseline_value: float
    statistic: float
    pvalue: float
    b: int | None = None  # McNemar's discordant pairs: the model right and the baseline wrong
    c: int | None = None  # ... and the reverse
    exact: bool | None = None

    @property
    def improved(self) -> bool:
        """The model's metric is better: higher accuracy, lower MAE."""
        if self.metric == "mae":
            return self.model_value < self.baseline_value
        return self.model_value > self.baseline_value

    def to_dict(self) -> dict[str, object]:
        return {"test": self.test, "metric": self.metric, "model_value": self.model_value,
                "baseline_value": self.baseline_value, "statistic": self.statistic, "pvalue": self.pvalue,
                **({"b": self.b, "c": self.c, "exact": self.exact} if self.test == "mcnemar" else {})}


def compare_to_baseline(kind: str, model: np.ndarray, baseline: np.ndarray, *, alpha: float = 0.05) -> Comparison:
    """The papers' test for the task's kind: McNemar on per-sample correctness (``model`` / ``baseline``:
    bool [N]) for classification, Wilcoxon signed-rank on absolute errors ([N], e.g. years) for regression."""
    if kind == "classification":
        test = mcnemar_test(model, baseline, alpha=alpha)
        return Comparison("mcnemar", "accuracy", 100 * float(np.mean(model)), 100 * float(np.mean(baseline)),
                          test.statistic, test.pvalue, b=test.b, c=test.c, exact=test.exact)
    if kind == "regression":
        result = wilcoxon_test(model, baseline)
        return Comparison("wilcoxon", "mae", float(np.mean(model)), float(np.mean(baseline)), result.statistic,
                          result.pvalue)
    raise ValueError(f"unknown task kind {kind!r}; valid kinds: classification, regression")
