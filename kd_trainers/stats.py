"""Statistics for KD studies, on pingouin: paired tests per metric, multiple-comparison correction, effect sizes with
confidence intervals, ANOVA, Spearman correlation, and the count of metrics that reject the null.

Results keep pingouin's own column names (`p_val`, `cohen_d`, `W_val`, `CI95`, ...), so that a reader who knows
pingouin reads them directly. Per-example scores come as pandas DataFrames, one row per example and one column per
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


PAIRED_METHODS = ("wilcoxon", "ttest")
CORRECTIONS = {"holm": "holm", "bh": "fdr_bh", "fdr_bh": "fdr_bh", "bonferroni": "bonf", "none": None}


def _as_array(values) -> np.ndarray:
    return np.asarray(values, dtype=float)


def paired_test(a: Sequence[float], b: Sequence[float], method: str = "wilcoxon") -> dict:
    """Paired test of `a` against `b` (same examples, same order).

    Returns pingouin's row as a dict: for `ttest` `T`, `dof`, `p_val`, `CI95`, `cohen_d`, `power`, `BF10`; for
    `wilcoxon` `W_val`, `p_val`, `RBC` (rank-biserial correlation), `CLES`. Plus `method`, `n`, `mean_a`, `mean_b`.
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
    if np.allclose(a, b):
        statistic = "T" if method == "ttest" else "W_val"
        return {**base, statistic: math.nan, "p_val": 1.0}
    if method == "ttest":
        row = pg.ttest(a, b, paired=True).iloc[0].to_dict()
    else:
        row = pg.wilcoxon(a, b).iloc[0].to_dict()
    return {**base, **row}


def effect_size(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> dict:
    """Paired Cohen's d of `a` against `b` with its confidence interval (pingouin's `compute_effsize`/`compute_esci`)."""
    a, b = _as_array(a), _as_array(b)
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


def compare(scores_a: pd.DataFrame, scores_b: pd.DataFrame, metrics: Sequence[str] | None = None,
            method: str = "wilcoxon", correction: str = "holm", alpha: float = 0.05) -> pd.DataFrame:
    """Configuration B (the treatment) against A (the baseline) on every metric: one row per metric (and per test
    when `method="both"`). Differences and effect sizes are B − A: positive when B scores higher.

    Columns: `metric`, `method`, `n`, `mean_a`, `mean_b`, `delta` (mean of B − A) with `delta_ci_low` and
    `delta_ci_high` (95% Student-t interval), `statistic`, `p_val`, `p_corr` (corrected across the metrics of one
    test), `reject` (p_corr < alpha), `cohen_d` (paired, of B over A), `ci_low`, `ci_high` (its interval).
    """
    a, b = _paired_frames(scores_a, scores_b)
    if metrics is None:
        metrics = [c for c in a.columns if c != "example_id" and pd.api.types.is_numeric_dtype(a[c])]
    missing = [m for m in metrics if m not in a or m not in b]
    if missing:
        raise ValueError(f"Metric(s) {missing} are not in both score tables (they have {sorted(set(a) & set(b))}).")
    methods = PAIRED_METHODS if method == "both" else (method,)
    rows = []
    for test in methods:
        block = []
        for metric in metrics:
            result = paired_test(a[metric], b[metric], method=test)
            statistic = result.get("T", result.get("W_val"))
            block.append({"metric": metric, "method": test, "n": result["n"], "mean_a": result["mean_a"],
                          "mean_b": result["mean_b"], **mean_difference(a[metric], b[metric]),
                          "statistic": statistic, "p_val": result["p_val"], **effect_size(b[metric], a[metric])})
        for row, corrected in zip(block, correct([row["p_val"] for row in block], correction)):
            row["p_corr"] = float(corrected)
            row["reject"] = bool(corrected < alpha)
        rows.extend(block)
    columns = ["metric", "method", "n", "mean_a", "mean_b", "delta", "delta_ci_low", "delta_ci_high", "statistic",
               "p_val", "p_corr", "reject", "cohen_d", "ci_low", "ci_high"]
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
