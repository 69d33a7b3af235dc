"""kd_trainers.evaluation.stats against pingouin and scipy called directly on fixed data."""

import math

import numpy as np
import pandas as pd
import pingouin as pg
import pytest
from scipy import stats as sps

from kd_trainers.evaluation import stats
from kd_trainers.study.report import anova_table


# Fixed per-example scores of two configurations (B is better on metric "m1", equal on "m3").
A = np.array([0.12, 0.40, 0.33, 0.58, 0.21, 0.47, 0.39, 0.05, 0.66, 0.30, 0.28, 0.51])
B = np.array([0.25, 0.43, 0.52, 0.61, 0.35, 0.44, 0.58, 0.15, 0.71, 0.42, 0.30, 0.64])
C = np.array([0.50, 0.51, 0.47, 0.62, 0.44, 0.58, 0.53, 0.49, 0.40, 0.55, 0.46, 0.57])


def test_paired_ttest_equals_scipy_and_pingouin():
    result = stats.paired_test(A, B, method="ttest")
    reference = sps.ttest_rel(A, B)
    assert result["T"] == pytest.approx(reference.statistic)
    assert result["p_val"] == pytest.approx(reference.pvalue)
    assert result["cohen_d"] == pytest.approx(pg.ttest(A, B, paired=True)["cohen_d"].iloc[0])
    assert result["n"] == 12 and result["mean_b"] == pytest.approx(B.mean())


def test_wilcoxon_equals_scipy():
    result = stats.paired_test(A, B, method="wilcoxon")
    reference = sps.wilcoxon(A, B)
    assert result["W_val"] == pytest.approx(reference.statistic)
    assert result["p_val"] == pytest.approx(reference.pvalue)
    assert "RBC" in result


def test_identical_scores_do_not_crash_and_do_not_reject():
    result = stats.paired_test(A, A, method="wilcoxon")
    assert result["p_val"] == 1.0 and math.isnan(result["W_val"])


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match=r"same length, got \(12,\) and \(3,\)"):
        stats.paired_test(A, B[:3])
    with pytest.raises(ValueError, match="method must be one of \\('wilcoxon', 'ttest', 'mcnemar'\\), got 'sign'"):
        stats.paired_test(A, B, method="sign")
    with pytest.raises(ValueError, match="correction must be one of"):
        stats.correct([0.1], "sidak")


def test_corrections_equal_pingouin_multicomp():
    p = [0.01, 0.04, 0.03, 0.20]
    np.testing.assert_allclose(stats.correct(p, "holm"), pg.multicomp(p, method="holm")[1])
    np.testing.assert_allclose(stats.correct(p, "bh"), pg.multicomp(p, method="fdr_bh")[1])
    np.testing.assert_allclose(stats.correct(p, "holm"), [0.04, 0.09, 0.09, 0.2])  # by hand: sorted p · (4, 3, 2, 1)


def test_effect_size_and_interval_equal_the_formulas_by_hand():
    result = stats.effect_size(A, B)
    # Paired Cohen's d_av: the mean difference over the mean of the two variances; its interval d ± t·SE with
    # SE = sqrt(1/n + d²/(2n)) and n − 1 degrees of freedom.
    d = (A.mean() - B.mean()) / math.sqrt((A.var(ddof=1) + B.var(ddof=1)) / 2)
    half = sps.t.ppf(0.975, 11) * math.sqrt(1 / 12 + d**2 / 24)
    assert result == pytest.approx({"cohen_d": d, "ci_low": d - half, "ci_high": d + half}, rel=1e-9)


def test_compare_per_metric_with_correction_and_reject_count():
    frame_a = pd.DataFrame({"example_id": range(12), "m1": A, "m2": C, "m3": A})
    frame_b = pd.DataFrame({"example_id": list(range(12))[::-1], "m1": B[::-1], "m2": A[::-1], "m3": A[::-1]})
    table = stats.compare(frame_a, frame_b, method="both", correction="holm")
    assert list(table["metric"]) == ["m1", "m2", "m3"] * 2
    wilcoxon = table[table["method"] == "wilcoxon"].set_index("metric")
    raw = [sps.wilcoxon(A, B).pvalue, sps.wilcoxon(C, A).pvalue, 1.0]
    np.testing.assert_allclose(wilcoxon["p_val"], raw)
    np.testing.assert_allclose(wilcoxon["p_corr"], pg.multicomp(raw, method="holm")[1])
    assert wilcoxon.loc["m1", "reject"] and not wilcoxon.loc["m3", "reject"]
    # B − A, by hand: the mean paired difference, its t interval, and Cohen's d positive when B is higher.
    differences = B - A
    half = sps.t.ppf(0.975, 11) * differences.std(ddof=1) / math.sqrt(12)
    assert wilcoxon.loc["m1", "delta"] == pytest.approx(differences.mean())
    assert (wilcoxon.loc["m1", "delta_ci_low"], wilcoxon.loc["m1", "delta_ci_high"]) == pytest.approx(
        (differences.mean() - half, differences.mean() + half))
    d = (B.mean() - A.mean()) / math.sqrt((A.var(ddof=1) + B.var(ddof=1)) / 2)
    assert wilcoxon.loc["m1", "cohen_d"] == pytest.approx(d) and d > 0
    assert wilcoxon.loc["m2", "delta"] == pytest.approx((A - C).mean()) and (A - C).mean() < 0
    assert stats.reject_count(table, "wilcoxon") == (int(wilcoxon["reject"].sum()), 3)
    with pytest.raises(ValueError, match="name one"):
        stats.reject_count(table)
    with pytest.raises(ValueError, match="different examples"):
        stats.compare(frame_a, frame_b.iloc[:5])


def test_anova_rm_anova_and_spearman_equal_pingouin_and_scipy():
    data = pd.DataFrame({"score": np.r_[A, B, C], "config": ["a"] * 12 + ["b"] * 12 + ["c"] * 12,
                         "example": list(range(12)) * 3})
    one_way = stats.anova(data, dv="score", between="config")
    assert one_way["F"].iloc[0] == pytest.approx(sps.f_oneway(A, B, C).statistic)
    assert one_way["p_unc"].iloc[0] == pytest.approx(sps.f_oneway(A, B, C).pvalue)
    repeated = stats.rm_anova(data, dv="score", within="config", subject="example")
    # By hand: the configurations' sum of squares over the error's (total − configurations − examples).
    scores = np.stack([A, B, C])  # [config, example]
    grand = scores.mean()
    ss_config = 12 * ((scores.mean(1) - grand) ** 2).sum()
    ss_example = 3 * ((scores.mean(0) - grand) ** 2).sum()
    ss_error = ((scores - grand) ** 2).sum() - ss_config - ss_example
    f = (ss_config / 2) / (ss_error / 22)
    assert repeated["F"].iloc[0] == pytest.approx(f)
    assert repeated["p_unc"].iloc[0] == pytest.approx(sps.f.sf(f, 2, 22))
    sigma = [0, 1, 2, 5, 0, 1, 2, 5]
    accuracy = [0.61, 0.60, 0.55, 0.20, 0.63, 0.58, 0.57, 0.22]
    result = stats.spearman(sigma, accuracy)
    reference = sps.spearmanr(sigma, accuracy)
    assert result["r"] == pytest.approx(reference.statistic) and result["p_val"] == pytest.approx(reference.pvalue)


def test_the_report_anova_leaves_out_metrics_with_no_more_examples_than_configurations():
    """pingouin's sphericity test divides by zero when the examples are not more than the configurations (a tiny
    study: 2 examples, 3 cells); the report's table leaves such a metric out rather than crash, and keeps the rest."""
    rng = np.random.default_rng(0)
    tiny = pd.DataFrame({"cell": ["a", "b", "c"] * 2, "example_id": [0, 0, 0, 1, 1, 1], "m": rng.random(6)})
    assert anova_table(tiny, ["m"]).empty
    enough = pd.DataFrame({"cell": ["a", "b", "c"] * 6, "example_id": np.repeat(range(6), 3), "m": rng.random(18)})
    table = anova_table(enough, ["m"])
    expected = pg.rm_anova(data=enough, dv="m", within="cell", subject="example_id").iloc[0]
    assert table.loc[0, "F"] == pytest.approx(expected["F"]) and table.loc[0, "ddof2"] == 10


# Right (1) or wrong (0) per item, as lm-eval's accuracy is: B gets 9 items A misses, A gets 2 that B misses.
RIGHT_A = np.array([1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 1, 0, 0, 1, 0, 1, 0], dtype=float)
RIGHT_B = np.array([1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1], dtype=float)


def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_pairs():
    only_b = int(((RIGHT_B == 1) & (RIGHT_A == 0)).sum())
    only_a = int(((RIGHT_A == 1) & (RIGHT_B == 0)).sum())
    assert (only_b, only_a) == (9, 2)
    result = stats.paired_test(RIGHT_A, RIGHT_B, method="mcnemar")
    assert (result["n01"], result["n10"]) == (only_b, only_a)
    assert result["p_val"] == pytest.approx(sps.binomtest(only_a, only_a + only_b, 0.5).pvalue)
    with pytest.raises(ValueError, match="0/1 scores"):
        stats.paired_test(A, B, method="mcnemar")


def test_auto_picks_mcnemar_for_right_or_wrong_items_and_wilcoxon_otherwise_and_pairs_what_both_scored():
    # Two kinds of rows in one table, as a study's scores.csv holds them: 12 generated answers (graded m1) and
    # 20 lm-eval items (0/1 acc), each NaN in the other's columns.
    a = pd.DataFrame({"example_id": [*range(12), *[f"task/{i}" for i in range(20)]],
                      "m1": [*A, *[np.nan] * 20], "task/acc": [*[np.nan] * 12, *RIGHT_A]})
    b = pd.DataFrame({"example_id": a["example_id"], "m1": [*B, *[np.nan] * 20],
                      "task/acc": [*[np.nan] * 12, *RIGHT_B]})
    b.loc[31, "task/acc"] = np.nan  # an item B has no score for: left out of that metric's pairs only
    table = stats.compare(a, b, correction="holm").set_index("metric")
    assert table.loc["m1", "method"] == "wilcoxon" and table.loc["m1", "n"] == 12
    assert table.loc["m1", "p_val"] == pytest.approx(sps.wilcoxon(A, B).pvalue)
    assert table.loc["task/acc", "method"] == "mcnemar" and table.loc["task/acc", "n"] == 19
    only_b = int(((RIGHT_B[:19] == 1) & (RIGHT_A[:19] == 0)).sum())
    only_a = int(((RIGHT_A[:19] == 1) & (RIGHT_B[:19] == 0)).sum())
    assert table.loc["task/acc", "p_val"] == pytest.approx(sps.binomtest(only_a, only_a + only_b, 0.5).pvalue)
    assert table.loc["task/acc", "mean_b"] == pytest.approx(RIGHT_B[:19].mean())
    # One family: Holm across both metrics, whatever test each took.
    np.testing.assert_allclose(table["p_corr"], pg.multicomp(list(table["p_val"]), method="holm")[1])
    with pytest.raises(ValueError, match="method must be one of"):
        stats.compare(a, b, method="mcnemr")


def test_the_minimum_detectable_effect_is_the_paired_t_tests_at_80_percent_power():
    from statsmodels.stats.power import TTestPower

    rng = np.random.default_rng(0)
    a = rng.normal(0.5, 0.2, 60)
    b = a + rng.normal(0.0, 0.1, 60)
    spread = (b - a).std(ddof=1)
    d = TTestPower().solve_power(nobs=60, alpha=0.01, power=0.8, alternative="two-sided")
    assert stats.minimum_detectable_effect(a, b, alpha=0.01) == pytest.approx(d * spread, rel=1e-3)
    # What it claims, checked by simulation: a true shift of that size is found about 80 % of the time.
    shift = stats.minimum_detectable_effect(a, b, alpha=0.05)
    found = [sps.ttest_rel(x + shift + rng.normal(0, spread, 60), x).pvalue < 0.05
             for x in (rng.normal(0.5, 0.2, 60) for _ in range(2000))]
    assert 0.77 < np.mean(found) < 0.83
    assert math.isnan(stats.minimum_detectable_effect([1, 2], [1, 3], alpha=0.05))  # too few pairs
    assert math.isnan(stats.minimum_detectable_effect([1, 2, 3], [2, 3, 4], alpha=0.05))  # differences without spread


def test_compare_gives_each_metric_its_detectable_effect_at_the_corrected_level():
    rng = np.random.default_rng(1)
    a = pd.DataFrame({"x": rng.normal(0, 1, 40), "y": rng.normal(0, 1, 40)})
    b = a + rng.normal(0.1, 0.5, (40, 2))
    table = stats.compare(a, b, method="ttest", correction="holm", alpha=0.05).set_index("metric")
    for metric in ("x", "y"):
        assert table.loc[metric, "mde"] == pytest.approx(
            stats.minimum_detectable_effect(a[metric], b[metric], alpha=0.025))  # α / 2 metrics
    none = stats.compare(a, b, method="ttest", correction="none").set_index("metric")
    assert none.loc["x", "mde"] == pytest.approx(stats.minimum_detectable_effect(a["x"], b["x"], alpha=0.05))
    assert none.loc["x", "mde"] < table.loc["x", "mde"]
