"""The study-2 analyses beyond pairwise hypotheses, each a table per declaration in the study file:

    anovas:               [{factor: method, levels: [kd, rev_kd, seqkd, gkd]}]    one-way ANOVA across those levels
    gains:                [{factor: method, baseline: sft, treatment: kd, against: width}]
                          the treatment's gain over the baseline at each level of `against`, and its Spearman
                          correlation with that (numeric) factor
    metric_correlations:  [{x: agreement, y: exact_match}]                      Spearman over cell × seed means

All of them start from the per-example scores of `report.collect_scores` (columns cell, <factors>, seed, example_id,
<metrics>).
"""

from __future__ import annotations

import math

import pandas as pd

from ..evaluation import stats


def anova_across_levels(scores: pd.DataFrame, factor: str, levels: list[str], metrics: list[str]) -> pd.DataFrame:
    """One-way ANOVA per metric across `levels` of `factor`, on seed-averaged per-example scores (pooled over the
    other factors' levels). Rows: metric, F, ddof1, ddof2, p_unc, np2."""
    subset = scores[scores[factor].isin(levels)]
    rows = []
    for metric in metrics:
        data = subset.groupby([factor, "cell", "example_id"])[metric].mean().reset_index().dropna()
        if data[factor].nunique() < 2 or data[metric].std() == 0 or math.isnan(data[metric].std()):
            continue
        result = stats.anova(data, dv=metric, between=factor).iloc[0]
        rows.append({"metric": metric, "F": result["F"], "ddof1": result["ddof1"], "ddof2": result["ddof2"],
                     "p_unc": result["p_unc"], "np2": result.get("np2", math.nan)})
    return pd.DataFrame(rows)


def gain_table(scores: pd.DataFrame, factor: str, baseline: str, treatment: str, against: str,
               metrics: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`(gains, correlations)`. gains: one row per (level of `against`, seed) with `treatment − baseline` mean per
    metric; correlations: Spearman between `against` (numeric) and each metric's gain, over those rows."""
    means = scores.groupby([against, "seed", factor])[metrics].mean()
    rows = []
    for (level, seed), group in means.groupby(level=[0, 1]):
        group = group.droplevel([0, 1])
        if baseline in group.index and treatment in group.index:
            rows.append({against: level, "seed": seed,
                         **{m: group.loc[treatment, m] - group.loc[baseline, m] for m in metrics}})
    gains = pd.DataFrame(rows)
    correlations = []
    if len(gains):
        x = gains[against].astype(float)
        for metric in metrics:
            y = gains[metric]
            if y.notna().sum() >= 3 and x[y.notna()].nunique() >= 2 and y.dropna().nunique() >= 2:
                result = stats.spearman(x[y.notna()], y.dropna())
                correlations.append({"metric": metric, "r": result["r"], "p_val": result["p_val"], "n": result["n"]})
    return gains, pd.DataFrame(correlations)


def metric_correlation(scores: pd.DataFrame, x: str, y: str) -> dict | None:
    """Spearman between two metrics over cell × seed means (do the students that imitate more score better?);
    None with fewer than three points or a constant side."""
    means = scores.groupby(["cell", "seed"])[[x, y]].mean().dropna()
    if len(means) < 3 or means[x].nunique() < 2 or means[y].nunique() < 2:
        return None
    result = stats.spearman(means[x], means[y])
    return {"x": x, "y": y, "r": result["r"], "p_val": result["p_val"], "n": result["n"]}
