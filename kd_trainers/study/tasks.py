"""The report's benchmark-task section: the lm-evaluation-harness metrics (`<task>/<metric>` columns) per
configuration, and per task the Spearman correlations the study declares (a numeric factor, or a treatment's gain
over a baseline against one, as the analytical study's Table 3 does), with p-values corrected across the tasks.

Paired tests between cells already cover the tasks: they are metrics of every hypothesis's table.
"""

from __future__ import annotations

import os

import pandas as pd

from ..evaluation import stats
from .analyses import gain_table
from .spec import Study


def task_metrics(metrics: list[str]) -> list[str]:
    """The lm-eval columns among the metrics (`arc_easy/acc`, `gsm8k/exact_match,strict-match`)."""
    return [metric for metric in metrics if "/" in metric]


def task_means(summary: pd.DataFrame, per_example: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per task metric: task, metric, items scored, then each configuration's mean (references last, named
    `<step> (reference)`)."""
    rows = []
    for column in metrics:
        task, metric = column.split("/", 1)
        row = {"task": task, "metric": metric, "items": int(per_example.groupby("cell")[column].count().max())}
        for _, line in summary.iterrows():
            name = f"{line['cell']} (reference)" if line.get("reference", False) else line["cell"]
            row[name] = line.get(column)
        rows.append(row)
    return pd.DataFrame(rows)


def _per_task(table: pd.DataFrame, metrics: list[str], correction: str = "holm") -> pd.DataFrame:
    """A Spearman table (metric, r, p_val, n) cut to the task metrics, one row for each (blank where a correlation is
    undefined: too few points, a constant side), with `p_corr` corrected across the tasks that have one."""
    columns = ["metric", "r", "p_val", "n"]
    rows = (table if len(table) else pd.DataFrame(columns=columns)).set_index("metric")
    subset = rows.reindex(metrics)[["r", "p_val", "n"]].reset_index()
    split = subset["metric"].str.split("/", n=1, expand=True)
    subset.insert(0, "task", split[0])
    subset["metric"] = split[1]
    tested = subset["p_val"].notna()
    subset["p_corr"] = float("nan")
    if tested.any():
        subset.loc[tested, "p_corr"] = stats.correct(subset.loc[tested, "p_val"].astype(float), correction)
    return subset


def task_sections(study: Study, scores: pd.DataFrame, per_example: pd.DataFrame, summary: pd.DataFrame,
                  correlations: list[tuple[str, pd.DataFrame]], markdown, folder: str) -> list[tuple]:
    """The report sections `(title, markdown, [images], [tables])` of the benchmark tasks; none without lm-eval
    metrics. `correlations`: the report's Spearman tables per factor; `markdown`: the report's table renderer. Writes
    `lm_eval_tasks.csv` (the means) and `lm_eval_correlations.csv` (every per-task correlation, column `analysis`)
    into `folder`."""
    metrics = task_metrics(list(per_example.columns))
    if not metrics:
        return []
    means = task_means(summary, per_example, metrics)
    means.to_csv(os.path.join(folder, "lm_eval_tasks.csv"), index=False)
    sections = [("Benchmark tasks (lm-evaluation-harness)",
                 "Mean item score per task and configuration (one row per metric lm-eval reports per item; "
                 "multiple-choice accuracy is by log-likelihood). Every hypothesis's paired test includes these "
                 "metrics, corrected together with the others.\n\n" + markdown(means), [], [means])]
    for factor, table in correlations:
        per_task = _per_task(table, metrics)
        sections.append((f"Per-task Spearman correlation with {factor}",
                         "Over cell × seed means; p_corr is Holm-corrected across the tasks. Blank: no correlation "
                         "(fewer than three points, or a metric that does not vary).\n\n" + markdown(per_task),
                         [], [per_task]))
    for gain in study.gains:
        factor, against = gain["factor"], gain["against"]
        baseline, treatment = str(gain["baseline"]), str(gain["treatment"])
        _, table = gain_table(scores, factor, baseline, treatment, against, metrics)
        per_task = _per_task(table, metrics)
        sections.append((f"Per-task Spearman of the {treatment} − {baseline} gain with {against}",
                         f"The gain of {factor}={treatment} over {factor}={baseline} per {against} and seed, "
                         f"correlated with {against} task by task (the analytical study's Table 3); p_corr is "
                         "Holm-corrected across the tasks. Blank: no correlation (fewer than three points, or a gain "
                         "that does not vary).\n\n" + markdown(per_task), [], [per_task]))
    tables = [table.assign(analysis=title) for title, _, _, (table,) in sections[1:]]
    (pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["analysis"])).to_csv(
        os.path.join(folder, "lm_eval_correlations.csv"), index=False)
    return sections
