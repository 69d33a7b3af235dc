"""Statistics for KD studies, on pingouin: paired tests per metric, multiple-comparison correction, effect sizes with
confidence intervals, ANOVA, Spearman correlation, and the count of metrics that reject the null.

`paired_test` keeps pingouin's own names (`W_val`, `T`, `p_val`, `RBC`, ...), so that a reader who knows pingouin
reads them directly; `compare` puts every test's statistic in one `statistic` column beside `p_val`, `p_corr` and
`cohen_d`. Per-example scores come as pandas DataFrames, one row per example and one column per
metric (what `kd_trainers.evaluation.score` returns); two configurations are paired row by row, or by an
`example_id` column when both have one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pingouin as pg
from scipy import stats as scipy_stats
from statsmodels.stats.contingency_tables import mcnemar


PAIRED_METHODS = ("wilcoxon", "ttest", "mcnemar")
# What `compare` accepts: a test, `auto` (McNemar's exact test for 0/1 scores, Wilcoxon otherwise) or `both`
# (Wilcoxon and the t-test, each its own family of corrections).
COMPARE_METHODS = (*PAIRED_METHODS, "auto", "both")
CORRECTIONS = {"holm": "holm", "bh": "fdr_bh", "fdr_bh": "fdr_bh", "bonferroni": "bonf", "none": None}


def _as_array(values) -> np.ndarray:
    return np.asarray(values, dtype=float)


def paired_test(a: Sequence[float], b: Sequence[float], method: str = "wilcoxon") -> dict:
    """Paired test of `a` against `b` (same examples, same order).

    Returns pingouin's row as a dict: for `ttest` `T`, `dof`, `p_val`, `CI95`, `cohen_d`, `power`, `BF10`; for
    `wilcoxon` `W_val`, `p_val`, `RBC` (rank-biserial correlation), `CLES`. For `mcnemar` (0/1 scores only: right or
    wrong on each item) statsmodels' exact test, binomial on the discordant pairs: `n01` (items only `b` gets right),
    `n10` (only `a`), `statistic` (the smaller of the two), `p_val`. Plus `method`, `n`, `mean_a`, `mean_b`.
    When every difference is zero there is nothing to test: `p_val` is 1.0 and the statistic NaN (scipy's Wilcoxon
    would fail there).
    """
    a, b = _as_array(a), _as_array(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_test needs two 1-D sequences of the same length, got {a.shape} and {b.shape}.")
    if method not in PAIRED_METHODS:
        raise ValueError(f"method must be one of {PAIRED_METHODS}, got {method!r}.")
    if len(a) < 2:
        raise ValueError(f"paired_test needs at least 2 pairs, got {len(a)}.")
    base = {"method": method, "n": len(a), "mean_a": float(a.mean()), "mean_b": float(b.mean())}
    if method == "mcnemar" and not (is_binary(a) and is_binary(b)):
        raise ValueError("McNemar's test needs 0/1 scores on both sides (right or wrong per item); use wilcoxon for "
                         "graded scores.")
    if np.allclose(a, b):
        statistic = {"ttest": "T", "wilcoxon": "W_val", "mcnemar": "statistic"}[method]
        return {**base, statistic: math.nan, "p_val": 1.0}
    if method == "mcnemar":
        only_b, only_a = int(((b == 1) & (a == 0)).sum()), int(((a == 1) & (b == 0)).sum())
        both, neither = int(((a == 1) & (b == 1)).sum()), int(((a == 0) & (b == 0)).sum())
        result = mcnemar([[neither, only_b], [only_a, both]], exact=True)
        return {**base, "n01": only_b, "n10": only_a, "statistic": float(result.statistic),
                "p_val": float(result.pvalue)}
    if method == "ttest":
        row = pg.ttest(a, b, paired=True).iloc[0].to_dict()
    else:
        row = pg.wilcoxon(a, b).iloc[0].to_dict()
    return {**base, **row}


def is_binary(values: Sequence[float]) -> bool:
    """Every value is 0 or 1 (an item right or wrong)."""
    values = _as_array(values)
    return bool(np.isin(values, (0.0, 1.0)).all())


def effect_size(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Paired Cohen's d of `a` against `b` with its confidence interval (pingouin's `compute_effsize`/`compute_esci`).
    Both without variance (every score equal: a metric nobody scores on) is NaN, without numpy's division warning."""
    a, b = _as_array(a), _as_array(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = float(pg.compute_effsize(a, b, paired=True, eftype="cohen"))
    if not math.isfinite(d):
        return {"cohen_d": d, "ci_low": math.nan, "ci_high": math.nan}
    # decimals: pingouin rounds the interval to 2 decimals by default; the report rounds for display itself.
    low, high = pg.compute_esci(stat=d, nx=len(a), ny=len(b), paired=True, eftype="cohen", confidence=confidence,
                                decimals=12)
    return {"cohen_d": d, "ci_low": float(low), "ci_high": float(high)}


def correct(p_values: Sequence[float], method: str = "holm") -> np.ndarray:
    """p-values corrected across metrics: `holm`, `bh` (Benjamini-Hochberg), `bonferroni` or `none`."""
    if method not in CORRECTIONS:
        raise ValueError(f"correction must be one of {sorted(CORRECTIONS)}, got {method!r}.")
    p_values = _as_array(p_values)
    if CORRECTIONS[method] is None or len(p_values) == 0:
        return p_values
    return np.asarray(pg.multicomp(p_values, method=CORRECTIONS[method])[1], dtype=float)


def _paired_frames(a: pd.DataFrame, b: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    if "example_id" in a and "example_id" in b:
        joined = a.merge(b, on="example_id", suffixes=("__a", "__b"))
        if len(joined) != len(a) or len(joined) != len(b):
            raise ValueError(f"The two configurations score different examples ({len(a)} and {len(b)} rows, "
                             f"{len(joined)} shared example_id values): pair them on the same test set.")
        columns = [c[:-3] for c in joined.columns if c.endswith("__a")]
        return (joined[[f"{c}__a" for c in columns]].set_axis(columns, axis=1),
                joined[[f"{c}__b" for c in columns]].set_axis(columns, axis=1))
    if len(a) != len(b):
        raise ValueError(f"The two configurations have {len(a)} and {len(b)} examples; paired tests need the same "
                         "examples (add an example_id column to pair them by id).")
    return a.reset_index(drop=True), b.reset_index(drop=True)


def mean_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """`b − a` paired: the mean difference with its Student-t confidence interval (mean ± t_{n−1}·s/√n of the
    per-example differences)."""
    differences = _as_array(b) - _as_array(a)
    n = len(differences)
    delta = float(differences.mean())
    if n < 2:
        return {"delta": delta, "delta_ci_low": math.nan, "delta_ci_high": math.nan}
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1) * differences.std(ddof=1) / math.sqrt(n))
    return {"delta": delta, "delta_ci_low": delta - half, "delta_ci_high": delta + half}


def minimum_detectable_effect(a: Sequence[float], b: Sequence[float], alpha: float, power: float = 0.8) -> float:
    """The smallest |mean difference| (in the metric's units) that this many pairs, with the spread their differences
    show, detect with probability `power` at two-sided level `alpha`: pingouin's power of the paired t-test solved for
    Cohen's d, times the standard deviation of the differences. (Wilcoxon's, on the same pairs, is within the test's
    asymptotic relative efficiency of it, 0.864 to 0.955 for the t-test's; McNemar's on 0/1 scores is of the same
    order.) NaN with fewer than 3 pairs or differences without spread."""
    differences = _as_array(b) - _as_array(a)
    spread = float(differences.std(ddof=1)) if len(differences) > 1 else math.nan
    if len(differences) < 3 or not math.isfinite(spread) or spread == 0:
        return math.nan
    d = pg.power_ttest(d=None, n=len(differences), power=power, alpha=alpha, contrast="paired")
    return float(d) * spread


def compare(scores_a: pd.DataFrame, scores_b: pd.DataFrame, metrics: Sequence[str] | None = None,
            method: str = "auto", correction: str = "holm", alpha: float = 0.05) -> pd.DataFrame:
    """Configuration B (the treatment) against A (the baseline) on every metric: one row per metric (and per test
    when `method="both"`). Differences and effect sizes are B − A: positive when B scores higher.

    `method`: one of `PAIRED_METHODS`, `auto` (per metric: McNemar's exact test when both sides score every item 0 or
    1, Wilcoxon otherwise; one family of corrections) or `both` (Wilcoxon and the t-test). Each metric is paired on
    the items both sides scored (a NaN on either side leaves the item out of that metric): lm-eval tasks and
    generated answers are different items in one table. A metric with fewer than two such items is left out.

    Columns: `metric`, `method`, `n`, `mean_a`, `mean_b`, `delta` (mean of B − A) with `delta_ci_low` and
    `delta_ci_high` (95% Student-t interval), `statistic`, `p_val`, `p_corr` (corrected across the metrics of one
    test), `reject` (p_corr < alpha), `cohen_d` (paired, of B over A), `ci_low`, `ci_high` (its interval), `mde`
    (`minimum_detectable_effect` at 80 % power and the level the correction asks of each test at most: α / m for m
    metrics, Holm's first step and Bonferroni's; α uncorrected): what a non-significant row could have detected.
    """
    a, b = _paired_frames(scores_a, scores_b)
    if metrics is None:
        metrics = [c for c in a.columns if c != "example_id" and pd.api.types.is_numeric_dtype(a[c])]
    missing = [m for m in metrics if m not in a or m not in b]
    if missing:
        raise ValueError(f"Metric(s) {missing} are not in both score tables (they have {sorted(set(a) & set(b))}).")
    if method not in COMPARE_METHODS:
        raise ValueError(f"method must be one of {COMPARE_METHODS}, got {method!r}.")
    families = ("wilcoxon", "ttest") if method == "both" else (method,)
    rows = []
    for family in families:
        block = []
        for metric in metrics:
            both = a[metric].notna() & b[metric].notna()
            if both.sum() < 2:
                continue
            x, y = a.loc[both, metric], b.loc[both, metric]
            test = family
            if family == "auto":
                test = "mcnemar" if is_binary(x) and is_binary(y) else "wilcoxon"
            result = paired_test(x, y, method=test)
            statistic = result.get("T", result.get("W_val", result.get("statistic")))
            block.append({"metric": metric, "method": test, "n": result["n"], "mean_a": result["mean_a"],
                          "mean_b": result["mean_b"], **mean_difference(x, y),
                          "statistic": statistic, "p_val": result["p_val"], **effect_size(y, x)})
        level = alpha if correction == "none" else alpha / max(len(block), 1)
        for row, corrected in zip(block, correct([row["p_val"] for row in block], correction)):
            row["p_corr"] = float(corrected)
            row["reject"] = bool(corrected < alpha)
            both = a[row["metric"]].notna() & b[row["metric"]].notna()
            row["mde"] = minimum_detectable_effect(a.loc[both, row["metric"]], b.loc[both, row["metric"]], level)
        rows.extend(block)
    columns = ["metric", "method", "n", "mean_a", "mean_b", "delta", "delta_ci_low", "delta_ci_high", "statistic",
               "p_val", "p_corr", "reject", "cohen_d", "ci_low", "ci_high", "mde"]
    return pd.DataFrame(rows, columns=columns)


def reject_count(comparison: pd.DataFrame, method: str | None = None) -> tuple[int, int]:
    """`(metrics rejecting the null, metrics tested)` in a `compare` table (for one test when both were run)."""
    table = comparison if method is None else comparison[comparison["method"] == method]
    if method is None and table["method"].nunique() > 1:
        raise ValueError("The table holds both tests; name one: reject_count(table, method='wilcoxon').")
    return int(table["reject"].sum()), len(table)


def anova(data: pd.DataFrame, dv: str, between: str) -> pd.DataFrame:
    """One-way ANOVA of `dv` across the groups in column `between` (pingouin's table: `F`, `p_unc`, `np2`)."""
    return pg.anova(data=data, dv=dv, between=between)


def rm_anova(data: pd.DataFrame, dv: str, within: str, subject: str) -> pd.DataFrame:
    """Repeated-measures ANOVA: the same examples (`subject`) scored under every configuration (`within`)."""
    return pg.rm_anova(data=data, dv=dv, within=within, subject=subject)


def spearman(x: Sequence[float], y: Sequence[float]) -> dict:
    """Spearman correlation between a numeric factor (student size, σ, T) and a metric: pingouin's `r`, `CI95`,
    `p_val`, `n`, `power`."""
    return pg.corr(_as_array(x), _as_array(y), method="spearman").iloc[0].to_dict()
