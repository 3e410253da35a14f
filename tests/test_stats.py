"""Known-value tests for occkd_core.stats (spec §12, §15 #30)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from occkd_core.stats import (compare_to_baseline, hodges_lehmann, holm_correction, judge_comparisons, mcnemar_test,
                              wilcoxon_test)


def correctness(both_right: int, b: int, c: int, both_wrong: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample correctness of (model, baseline) with the given 2x2 table, in a shuffled order."""
    model = np.array([True] * both_right + [True] * b + [False] * c + [False] * both_wrong)
    baseline = np.array([True] * both_right + [False] * b + [True] * c + [False] * both_wrong)
    order = np.random.default_rng(0).permutation(model.size)
    return model[order], baseline[order]


def test_mcnemar_exact_binomial_b10_c2() -> None:
    # b + c = 12 < 25 -> exact: p = 2 · Σ_{k<=2} C(12, k) / 2^12 = 2 · (1 + 12 + 66) / 4096 = 158 / 4096
    result = mcnemar_test(*correctness(both_right=20, b=10, c=2, both_wrong=5))
    assert (result.b, result.c, result.exact) == (10, 2, True)
    assert result.pvalue == pytest.approx(158 / 4096)  # 0.0386
    assert result.statistic == 2.0  # statsmodels reports min(b, c) for the exact test
    assert result.significant and result.improved and result.significant_improvement


def test_mcnemar_chi_square_b30_c10() -> None:
    # b + c = 40 >= 25 -> χ² = (|30 - 10| - 1)² / 40 = 361 / 40 = 9.025, 1 d.o.f.
    # The χ²(1) survival function is erfc(sqrt(x / 2)): erfc(sqrt(4.5125)) = 0.002663
    result = mcnemar_test(*correctness(both_right=50, b=30, c=10, both_wrong=7))
    assert (result.b, result.c, result.exact) == (30, 10, False)
    assert result.statistic == pytest.approx(9.025)
    assert result.pvalue == pytest.approx(math.erfc(math.sqrt(9.025 / 2)))
    assert result.significant  # p < 0.05, i.e. χ² > 3.841


def test_mcnemar_exact_switch_at_25_discordant_pairs() -> None:
    assert mcnemar_test(*correctness(5, 13, 11, 5)).exact  # b + c = 24
    assert not mcnemar_test(*correctness(5, 13, 12, 5)).exact  # b + c = 25


def test_mcnemar_worse_model_and_no_discordant_pairs() -> None:
    worse = mcnemar_test(*correctness(20, b=2, c=10, both_wrong=5))
    assert worse.significant and not worse.improved and not worse.significant_improvement
    same = mcnemar_test(*correctness(8, b=0, c=0, both_wrong=2))
    assert same.pvalue == 1.0 and not same.significant  # P(X <= 0 | n = 0) = 1


def test_mcnemar_alpha_decides_significance() -> None:
    # p = 158/4096 = 0.0386: significant at 0.05, not at 0.01
    assert not mcnemar_test(*correctness(20, 10, 2, 5), alpha=0.01).significant


def test_mcnemar_rejects_bad_input() -> None:
    model, baseline = correctness(5, 3, 2, 1)
    with pytest.raises(ValueError, match="11 samples but"):
        mcnemar_test(model, baseline[:-1])
    with pytest.raises(ValueError, match="bool array"):
        mcnemar_test(model.astype(int), baseline)
    with pytest.raises(ValueError, match="alpha"):
        mcnemar_test(model, baseline, alpha=1.5)


def test_holm_correction_known_values() -> None:
    # Sorted p: 0.01, 0.03, 0.04 with m = 3 -> 3·0.01 = 0.03; max(0.03, 2·0.03) = 0.06; max(0.06, 1·0.04) = 0.06
    reject, adjusted = holm_correction([0.01, 0.04, 0.03])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06])  # back in the input order
    assert reject.tolist() == [True, False, False]
    assert reject.dtype == bool


def test_holm_is_step_down_not_bonferroni() -> None:
    # 0.01·3 = 0.03; 0.02·2 = 0.04 (Bonferroni would give 0.06 and not reject); 0.5·1 = 0.5
    reject, adjusted = holm_correction([0.5, 0.02, 0.01], alpha=0.05)
    assert adjusted == pytest.approx([0.5, 0.04, 0.03])
    assert reject.tolist() == [False, True, True]


def test_holm_rejects_bad_pvalues() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm_correction([0.2, 1.2])
    with pytest.raises(ValueError, match="non-empty"):
        holm_correction([])


def test_wilcoxon_small_example_by_hand() -> None:
    # differences d = model - baseline = [1, -2, 3, 4, 5]; ranks of |d| = 1..5; W- = 2, W+ = 13.
    # Exact null: subsets of {1..5} with rank sum <= 2 are {}, {1}, {2} -> 3 of 2^5 = 32;
    # two-sided p = 2 · 3/32 = 0.1875
    baseline = np.array([2.0, 4.0, 1.0, 1.0, 1.0])
    model = baseline + np.array([1.0, -2.0, 3.0, 4.0, 5.0])
    result = wilcoxon_test(model, baseline)
    assert result.statistic == 2.0
    assert result.pvalue == pytest.approx(0.1875)
    assert result.median_difference == 3.0
    assert result.num_pairs == 5
    # R+ = 1 + 3 + 4 + 5 = 13 (the model's error larger), R- = 2: the model is worse in the tested sense
    assert (result.rank_sum_worse, result.rank_sum_better) == (13.0, 2.0) and not result.improved
    # Walsh averages of [-2, 1, 3, 4, 5]: -2, -0.5, 0.5, 1, 1, 1.5, 2, 2.5, 3, 3, 3.5, 4, 4, 4.5, 5 -> 8th of 15 = 2.5
    assert result.hodges_lehmann == 2.5


def test_wilcoxon_scipy_documented_example() -> None:
    # scipy.stats.wilcoxon docs: these 15 differences give statistic 24 (ranks 10 + 14 of the two
    # negative ones) and two-sided exact p = 0.041259765625.
    d = np.array([6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75], dtype=float)
    baseline = np.full(d.size, 100.0)
    result = wilcoxon_test(baseline + d, baseline)
    assert result.statistic == 24.0
    assert result.pvalue == pytest.approx(0.041259765625)
    # sorted d: -67, -48, 6, 8, 14, 16, 23, [24], 28, 29, 41, 49, 56, 60, 75 -> the 8th of 15 is 24
    assert result.median_difference == 24.0


def test_wilcoxon_zero_differences() -> None:
    errors = np.array([1.0, 2.5, 3.0])
    same = wilcoxon_test(errors, errors.copy())
    assert (same.pvalue, same.statistic, same.median_difference, same.num_pairs) == (1.0, 0.0, 0.0, 3)
    # A zero difference is dropped ("wilcox"): [0, 1, -2, 3, 4, 5] tests like [1, -2, 3, 4, 5] -> p = 0.1875
    baseline = np.array([1.0, 2.0, 4.0, 1.0, 1.0, 1.0])
    model = baseline + np.array([0.0, 1.0, -2.0, 3.0, 4.0, 5.0])
    result = wilcoxon_test(model, baseline)
    assert result.pvalue == pytest.approx(0.1875) and result.num_pairs == 6


def test_wilcoxon_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="3 samples but"):
        wilcoxon_test(np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="absolute errors"):
        wilcoxon_test(np.array([1.0, -1.0]), np.ones(2))
    with pytest.raises(ValueError, match="NaN"):
        wilcoxon_test(np.array([1.0, np.nan]), np.ones(2))


def test_wilcoxon_direction_follows_the_ranks_not_the_mean() -> None:
    """Skewed errors: the model is 1-11 years better on 11 faces and 90 years worse on one. Its MAE is
    higher (mean d = (-66 + 90) / 12 = +2.0), yet the signed-rank test rejects because it is better:
    |d| ranks 1..11 are the negative ones, rank 12 the positive, so R- = 66, R+ = 12 = the statistic.
    Exact two-sided p: subsets of {1..12} with rank sum <= 12 number 1+1+1+2+2+3+4+5+6+8+10+12+15 = 70
    (partitions of 0..12 into distinct parts), so p = 2 · 70 / 2^12 = 0.0341796875."""
    d = np.array([-1.0, -2, -3, -4, -5, -6, -7, -8, -9, -10, -11, 90])
    baseline = np.full(d.size, 12.0)
    model = baseline + d  # absolute errors 11, 10, ..., 1 and 102
    assert np.mean(model) - np.mean(baseline) == pytest.approx(2.0)  # worse by the mean
    result = wilcoxon_test(model, baseline)
    assert (result.rank_sum_better, result.rank_sum_worse, result.statistic) == (66.0, 12.0, 12.0)
    assert result.pvalue == pytest.approx(140 / 4096)
    assert result.improved
    # Walsh averages: 66 from pairs of negatives, -(i + j)/2; 12 from pairs with 90. The 39th and 40th of
    # 78 are the 27th and 28th smallest i + j among the negatives: i + j = 2..10 give 25 pairs, 11 gives
    # five more, so both are -11/2.
    assert result.hodges_lehmann == -5.5 and result.median_difference == -5.5
    comparison = compare_to_baseline("regression", model, baseline)
    assert comparison.model_value == pytest.approx(14.0) and comparison.baseline_value == pytest.approx(12.0)
    assert comparison.improved and comparison.hodges_lehmann == -5.5
    assert comparison.to_dict()["hodges_lehmann"] == -5.5
    verdict, = judge_comparisons([comparison.pvalue], [comparison.improved])
    assert verdict.verdict == verdict.verdict_holm == "better" and verdict.dagger
    # Mirrored (the model 90 years better on one face, worse on the rest): worse, though its MAE is lower.
    mirrored = wilcoxon_test(baseline, model)
    assert not mirrored.improved and mirrored.hodges_lehmann == 5.5
    assert judge_comparisons([mirrored.pvalue], [mirrored.improved])[0].verdict == "worse"


def test_wilcoxon_statistic_is_the_smaller_rank_sum_and_hodges_lehmann_agrees_in_sign() -> None:
    rng = np.random.default_rng(4)
    for _ in range(20):
        baseline = rng.gamma(2.0, 3.0, 40)
        model = np.abs(baseline + rng.standard_t(2, 40) + rng.normal(0.0, 1.0))
        result = wilcoxon_test(model, baseline)
        assert result.statistic == pytest.approx(min(result.rank_sum_worse, result.rank_sum_better))
        assert result.rank_sum_worse + result.rank_sum_better == 40 * 41 / 2  # continuous: no zeros, no ties
        assert result.improved == (result.hodges_lehmann < 0)


def test_hodges_lehmann_known_values() -> None:
    assert hodges_lehmann(np.array([1.0, 2.0, 9.0])) == 3.5  # Walsh averages 1, 1.5, 2, 5, 5.5, 9 -> (2 + 5) / 2
    assert hodges_lehmann(np.array([0.0, 0.0, 4.0])) == 4.0  # zeros dropped, as the test drops them
    assert hodges_lehmann(np.zeros(3)) == 0.0


def test_mcnemar_comparison_direction_is_b_over_c() -> None:
    model, baseline = correctness(50, 10, 2, 8)
    comparison = compare_to_baseline("classification", model, baseline)
    assert comparison.improved and comparison.model_value > comparison.baseline_value
    assert (comparison.b, comparison.c) == (10, 2) and "hodges_lehmann" not in comparison.to_dict()
    assert not compare_to_baseline("classification", baseline, model).improved
