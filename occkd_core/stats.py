"""Paired significance tests against the undistilled student (spec §12, §15 #30).

* McNemar (Dietterich 1998) on per-sample correctness, for expressions and gender: the daggers.
* Wilcoxon signed-rank on per-sample absolute errors, for age, where the papers report no test; its
  direction (better / worse) comes from the signed ranks the test is built on, not from the mean MAE.
* Holm's correction over a family of such tests.
* :func:`judge_comparisons`: both readings of a family of tests side by side, the papers' rule
  (uncorrected p < α, † where the model is also better) and the Holm-corrected verdict.

The family the grid corrects over is everything one task's table marks: each distilled student and each
fused model of every architecture, against the main student of that same architecture, on every test set
of the task (``grid/nodes.py``, ``run_significance_node``; one family per task and seed). So a family holds
several baselines (one per architecture), not one. It is drawn that wide because a reader scans the whole
table for daggers: Holm over it bounds the chance of any false dagger in the table at α, where a family
per architecture or per test set would let that chance grow with the number of networks and test sets.
The tests against the teacher-free controls (each distilled model against its control, the fusion against
the control fusion) answer another question, what the teacher adds, and are a second family of their own,
drawn as wide (every architecture and test set of the task), so neither correction counts the other's tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import rankdata, wilcoxon
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
    """Outcome of a two-sided Wilcoxon signed-rank test on paired absolute errors, d = model − baseline."""

    statistic: float  # scipy's two-sided statistic: the smaller of the two rank sums
    pvalue: float
    rank_sum_worse: float  # R+: ranks of |d| summed over the pairs where the model's error is larger
    rank_sum_better: float  # R−: the same over the pairs where the model's error is smaller
    hodges_lehmann: float  # the test's estimate of the shift in d (years): negative = the model is better
    median_difference: float  # median of d (the sign test's statistic, for reference)
    num_pairs: int  # all pairs, including those with zero difference (which the test drops)

    @property
    def improved(self) -> bool:
        """The model's errors are smaller in the sense the test measures: R− > R+.

        Not the mean error: one face the model gets wildly wrong can raise its mean above the
        baseline's while it is better on most faces, and the signed-rank test (which ranks |d|)
        then rejects *because* the model is better. The Hodges–Lehmann estimate has the same sign
        as R− − R+ unless |d| has ties."""
        return self.rank_sum_better > self.rank_sum_worse


def hodges_lehmann(differences: np.ndarray) -> float:
    """Hodges–Lehmann estimate of the centre of paired differences [N]: the median of the N(N+1)/2 Walsh
    averages (dᵢ + dⱼ)/2, i ≤ j (Hollander & Wolfe, "Nonparametric Statistical Methods", §3.2), the
    estimator that inverts the signed-rank test. Zero differences are dropped first, as the test drops
    them; 0.0 when none is left. Exact, and holds the Walsh averages in memory: 90 MB for UTKFace's
    4,738 test faces."""
    d = np.sort(np.asarray(differences, dtype=float))
    d = d[d != 0]
    if d.size == 0:
        return 0.0
    walsh = np.empty(d.size * (d.size + 1) // 2)
    start = 0
    for i in range(d.size):
        walsh[start:start + d.size - i] = (d[i] + d[i:]) / 2
        start += d.size - i
    return float(np.median(walsh, overwrite_input=True))


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
    nonzero = differences[differences != 0]
    # The test's own ranks ("wilcox": zeros dropped, then |d| ranked with ties averaged), so the
    # direction is read from the statistic the p-value is about.
    ranks = rankdata(np.abs(nonzero))
    worse, better = float(ranks[nonzero > 0].sum()), float(ranks[nonzero < 0].sum())
    common = dict(rank_sum_worse=worse, rank_sum_better=better, hodges_lehmann=hodges_lehmann(nonzero),
                  median_difference=float(np.median(differences)), num_pairs=model.size)
    if nonzero.size == 0:
        # scipy has no ranks to work with here (and warns or raises, by version): identical errors
        # on every sample are no evidence of a difference.
        return WilcoxonResult(statistic=0.0, pvalue=1.0, **common)
    result = wilcoxon(differences, zero_method="wilcox", alternative="two-sided")
    return WilcoxonResult(statistic=float(result.statistic), pvalue=float(result.pvalue), **common)


#: What a verdict says of a model against its baseline.
BETTER, WORSE, NO_DIFFERENCE = "better", "worse", "no significant difference"


@dataclass(frozen=True)
class Verdict:
    """One comparison of a family judged both ways (spec §12)."""

    pvalue: float  # the test's own p-value
    improved: bool  # the direction of the test's statistic (Comparison.improved): the model is better
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
    """Verdicts for one family of comparisons, in input order: each p-value read by the papers' rule
    (uncorrected, p < ``alpha``) and after Holm's correction over the whole family. The family may mix
    baselines: the grid passes every comparison of a task at once (see the module docstring)."""
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
    # The direction of the test's own statistic: McNemar b > c (the same as higher accuracy), Wilcoxon
    # R− > R+ (which can differ from a lower MAE: see WilcoxonResult.improved).
    improved: bool
    b: int | None = None  # McNemar's discordant pairs: the model right and the baseline wrong
    c: int | None = None  # ... and the reverse
    exact: bool | None = None
    hodges_lehmann: float | None = None  # Wilcoxon: the estimated shift in absolute error (model − baseline)

    def to_dict(self) -> dict[str, object]:
        return {"test": self.test, "metric": self.metric, "model_value": self.model_value,
                "baseline_value": self.baseline_value, "statistic": self.statistic, "pvalue": self.pvalue,
                **({"b": self.b, "c": self.c, "exact": self.exact} if self.test == "mcnemar" else {}),
                **({"hodges_lehmann": self.hodges_lehmann} if self.test == "wilcoxon" else {})}


def compare_to_baseline(kind: str, model: np.ndarray, baseline: np.ndarray, *, alpha: float = 0.05) -> Comparison:
    """The papers' test for the task's kind: McNemar on per-sample correctness (``model`` / ``baseline``:
    bool [N]) for classification, Wilcoxon signed-rank on absolute errors ([N], e.g. years) for regression."""
    if kind == "classification":
        test = mcnemar_test(model, baseline, alpha=alpha)
        return Comparison("mcnemar", "accuracy", 100 * float(np.mean(model)), 100 * float(np.mean(baseline)),
                          test.statistic, test.pvalue, improved=test.improved, b=test.b, c=test.c, exact=test.exact)
    if kind == "regression":
        result = wilcoxon_test(model, baseline)
        return Comparison("wilcoxon", "mae", float(np.mean(model)), float(np.mean(baseline)), result.statistic,
                          result.pvalue, improved=result.improved, hodges_lehmann=result.hodges_lehmann)
    raise ValueError(f"unknown task kind {kind!r}; valid kinds: classification, regression")
