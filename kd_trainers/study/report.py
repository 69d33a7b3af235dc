"""The study report: `report.md`, a self-contained `report.html` (plots embedded), PNG plots and CSVs.

Per-example scores of a cell are averaged over its seeds before any test, so that every test pairs the same examples.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from ..evaluation import stats
from ..evaluation.harness import is_task_item
from ..runtime.files import is_done
from .analyses import anova_across_levels, gain_table, metric_correlation
from .spec import DEFAULT_TEST, Cell, Study, cell_dir, reference_dir, references_file
from .tasks import task_sections


def _items(scores: pd.DataFrame) -> str:
    """"90 test examples", "90 test examples and 180 lm-eval items" (`example_id` `<task>/<doc_id>`)."""
    ids = scores["example_id"].drop_duplicates()
    tasks = int(is_task_item(ids).sum())
    return f"{len(ids) - tasks} test examples" + (f" and {tasks} lm-eval items" if tasks else "")


def _read_scores(directory: str) -> pd.DataFrame:
    """A `scores.csv`, its `example_id` as text: generated answers are numbered, lm-eval items are `<task>/<doc_id>`,
    and a file with only the former must pair with one holding both."""
    frame = pd.read_csv(os.path.join(directory, "scores.csv"))
    frame["example_id"] = frame["example_id"].astype(str)
    return frame


def collect_scores(study: Study) -> pd.DataFrame:
    """Every finished cell's per-example scores: columns cell, <factors>, seed, example_id, <metrics>."""
    frames = []
    for cell in study.cells:
        for seed in study.seeds:
            directory = cell_dir(study, cell, seed)
            if not is_done(directory):
                continue
            frame = _read_scores(directory)
            frame.insert(0, "seed", seed)
            for factor, level in reversed(list(cell.levels.items())):
                frame.insert(0, factor, level)
            frame.insert(0, "cell", cell.name)
            frames.append(frame)
    if not frames:
        raise ValueError(f"No finished cell under {study.output_dir}: run the study first.")
    return pd.concat(frames, ignore_index=True)


def _metric_columns(scores: pd.DataFrame, study: Study) -> list[str]:
    skip = {"cell", "seed", "example_id", *study.factors}
    return [c for c in scores.columns if c not in skip and scores[c].notna().any()]


def seed_averaged(scores: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """One row per (cell, example): the metrics averaged over the cell's seeds. Every table and test starts here."""
    return scores.groupby(["cell", "example_id"])[metrics].mean().reset_index()


def summary_table(per_example: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Mean and 95% Student-t confidence-interval half-width per cell and metric, over the seed-averaged examples (and
    lm-eval items, each metric over the rows that have it):
    t_{0.975, n−1} · s / √n (not 1.96, which understates the interval for the few examples of a small study)."""
    rows = []
    for cell, group in per_example.groupby("cell", sort=False):
        # n: the generated answers scored; lm-eval items (`<task>/<doc_id>`) are counted per task in its own table.
        row = {"cell": cell, "n": int((~is_task_item(group["example_id"])).sum())}
        for metric in metrics:
            values = group[metric].dropna()
            n = len(values)
            half = scipy_stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan
            row[metric] = values.mean()
            row[f"{metric}_ci"] = half
        rows.append(row)
    return pd.DataFrame(rows)


def hypothesis_tables(study: Study, per_example: pd.DataFrame, metrics: list[str]) -> list[tuple[dict, pd.DataFrame]]:
    """Each hypothesis's paired comparison on every metric, over the items both cells scored (a metric one cell lacks,
    agreement for an SFT student, is left out); corrected across the metrics, lm-eval tasks included."""
    results = []
    for hypothesis in study.hypotheses:
        names = [Cell({f: str(hypothesis[side][f]) for f in study.factors}, {}).name for side in ("a", "b")]
        a, b = (per_example.loc[per_example["cell"] == name, ["example_id", *metrics]] for name in names)
        table = stats.compare(a, b, metrics=metrics, method=hypothesis.get("method", DEFAULT_TEST),
                              correction=hypothesis.get("correction", "holm"), alpha=study.alpha)
        results.append(({**hypothesis, "a_cell": names[0], "b_cell": names[1]}, table))
    return results


def correlation_tables(study: Study, scores: pd.DataFrame, metrics: list[str]) -> list[tuple[str, pd.DataFrame]]:
    """Spearman between a numeric factor and each metric, over cell × seed means (the examples are not independent
    observations of the factor)."""
    results = []
    for correlation in study.correlations:
        factor = correlation["factor"]
        means = scores.groupby(["cell", "seed", factor])[metrics].mean().reset_index()
        rows = []
        for metric in correlation.get("metrics", metrics):
            x, y = means[factor].astype(float), means[metric]
            if y.notna().sum() < 3 or x.nunique() < 2:
                continue
            result = stats.spearman(x[y.notna()], y.dropna())
            rows.append({"metric": metric, "r": result["r"], "p_val": result["p_val"], "n": result["n"]})
        results.append((factor, pd.DataFrame(rows)))
    return results


def anova_table(per_example: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Repeated-measures ANOVA per metric across every configuration (the test examples are the subjects), on the
    seed-averaged scores; only with three configurations or more and examples scored in all of them."""
    if per_example["cell"].nunique() < 3:
        return pd.DataFrame()
    rows = []
    for metric in metrics:
        data = per_example[["cell", "example_id", metric]].dropna()
        complete = data.groupby("example_id")["cell"].nunique() == data["cell"].nunique()
        data = data[data["example_id"].isin(complete[complete].index)]
        # The sphericity correction needs more examples than configurations (pingouin divides by zero otherwise).
        if data["example_id"].nunique() <= data["cell"].nunique() or data[metric].std() == 0:
            continue
        result = stats.rm_anova(data, dv=metric, within="cell", subject="example_id").iloc[0]
        if "F" not in result:  # pingouin gives no F when a configuration's scores do not vary at all
            continue
        rows.append({"metric": metric, "F": result["F"], "ddof1": result["ddof1"], "ddof2": result["ddof2"],
                     "p_unc": result["p_unc"], "p_GG_corr": result.get("p_GG_corr", math.nan)})
    return pd.DataFrame(rows)


def _analyses(study: Study, scores: pd.DataFrame, metrics: list[str], plots: str) -> list[tuple]:
    """`(section title, markdown, [(plot title, path)], [tables])` for the study's `anovas`, `gains` and
    `metric_correlations`."""
    sections = []
    for anova in study.anovas:
        factor = anova["factor"]
        levels = [str(level) for level in anova.get("levels") or study.factors[factor]]
        table = anova_across_levels(scores, factor, levels, metrics)
        title = f"One-way ANOVA across {factor} ∈ {{{', '.join(levels)}}}"
        text = ("Per-example scores (seed-averaged) grouped by level; np2 is partial eta squared.\n\n"
                + (_markdown(table) if len(table) else "Too few varying scores for an ANOVA.\n"))
        sections.append((title, text, [], [table]))
    for gain in study.gains:
        factor, against = gain["factor"], gain["against"]
        baseline, treatment = str(gain["baseline"]), str(gain["treatment"])
        gains, correlations = gain_table(scores, factor, baseline, treatment, against, metrics)
        title = f"Gain of {factor}={treatment} over {factor}={baseline} against {against}"
        text = (f"Mean {treatment} − mean {baseline} per {against} and seed, then Spearman between {against} and "
                "each metric's gain.\n\n" + (_markdown(gains) if len(gains) else "No level has both cells.\n")
                + "\n" + (_markdown(correlations) if len(correlations) else "Too few points for a correlation.\n"))
        images = []
        if len(gains):
            for metric in metrics:
                path = plot_path(plots, "gain", treatment, against, metric)
                _plot_factor(gains, against, metric, path, title=f"{metric} gain of {treatment} against {against}")
                images.append((f"{metric} gain of {treatment} over {baseline} against {against}", path))
        sections.append((title, text, images, [gains, correlations]))
    if study.metric_correlations:
        rows = [metric_correlation(scores, pair["x"], pair["y"]) for pair in study.metric_correlations
                if pair["x"] in scores and pair["y"] in scores]
        table = pd.DataFrame([row for row in rows if row])
        title = "Correlation between metrics"
        images = []
        for pair in study.metric_correlations:
            if pair["x"] in scores and pair["y"] in scores:
                path = plot_path(plots, "scatter", pair["x"], pair["y"])
                _plot_scatter(scores, pair["x"], pair["y"], path)
                images.append((f"{pair['y']} against {pair['x']}", path))
        text = ("Spearman over cell × seed means: do the students that imitate the teacher more also score better?\n\n"
                + (_markdown(table) if len(table) else "Too few points for a correlation.\n"))
        sections.append((title, text, images, [table]))
    return sections


def plot_path(plots: str, *parts: str) -> str:
    """A plot's file: its parts joined by `_`, every character a file name should not hold (the `/` and `,` of lm-eval
    metrics, `arc_easy/acc`) as `_`."""
    return os.path.join(plots, re.sub(r"[^A-Za-z0-9_.=-]+", "_", "_".join(map(str, parts))) + ".png")


def _plot_scatter(scores: pd.DataFrame, x: str, y: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = scores.groupby(["cell", "seed"])[[x, y]].mean().reset_index()
    figure, axis = plt.subplots(figsize=(4.5, 3.4))
    for cell, group in means.groupby("cell", sort=False):
        axis.scatter(group[x], group[y], label=cell, s=24)
    if means["cell"].nunique() <= 12:
        axis.legend(fontsize=6, frameon=False)
    _finish(figure, axis, x, y, f"{y} against {x} (one point per cell and seed)", path)


def _plot_metric(summary: pd.DataFrame, metric: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    references = summary[summary["reference"]] if "reference" in summary else summary.iloc[:0]
    configurations = summary[~summary["reference"]] if "reference" in summary else summary
    figure, axis = plt.subplots(figsize=(max(4.0, 1.1 * len(configurations) + 1.5), 3.2))
    positions = np.arange(len(configurations))
    axis.bar(positions, configurations[metric], yerr=configurations[f"{metric}_ci"].fillna(0), capsize=4,
             color="#4C72B0", alpha=0.85)
    drawn = False
    for (_, row), style in zip(references.iterrows(), ("--", ":", "-.", (0, (5, 5)))):
        if metric in row and not pd.isna(row[metric]):  # the teacher: the ceiling the bars are read against
            axis.axhline(row[metric], linestyle=style, color="#C44E52", linewidth=1.2, label=row["cell"])
            drawn = True
    if drawn:
        axis.legend(fontsize=7, frameon=False)
    axis.set_xticks(positions, configurations["cell"], rotation=20, ha="right", fontsize=8)
    _finish(figure, axis, None, metric, f"{metric} by configuration (mean ± 95% Student-t CI)", path)


def _plot_factor(scores: pd.DataFrame, factor: str, metric: str, path: str, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = scores.groupby(["seed", factor])[metric].mean().reset_index()
    means[factor] = means[factor].astype(float)
    curve = means.groupby(factor)[metric].agg(["mean", "std"]).reset_index().sort_values(factor)
    figure, axis = plt.subplots(figsize=(4.5, 3.2))
    axis.errorbar(curve[factor], curve["mean"], yerr=curve["std"].fillna(0), marker="o", capsize=4, color="#DD8452")
    _finish(figure, axis, factor, metric, title or f"{metric} against {factor} (mean ± sd over seeds)", path)


def _finish(figure, axis, xlabel, ylabel, title, path) -> None:
    import matplotlib.pyplot as plt

    if xlabel:
        axis.set_xlabel(xlabel)
    if ylabel:
        axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |\n|" + "---|" * len(frame.columns) + "\n"
    return header + "".join("| " + " | ".join(format_value(value, str(column)) for column, value in zip(frame.columns, row))
                            + " |\n" for row in frame.itertuples(index=False))


HEADLINE_METRICS = ("rouge_l", "exact_match", "bleu_4")  # the first one scored leads the headline, unless the study names one


def format_value(value, column: str = "") -> str:
    """A number for reading: 3 significant digits, p-values below 0.001 as `< 0.001`, blanks for missing values."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else ""
    if isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        if column.startswith("p") and value < 0.001:
            return "< 0.001"
        return f"{value:.3g}"
    return str(value)


def reference_names(study: Study) -> list[str]:
    """The study's reference rows as its last run listed them (`references.json`: prepare steps, then the cells'
    other teachers), else its prepare steps."""
    path = references_file(study)
    if os.path.exists(path):
        with open(path) as handle:
            return json.load(handle)
    return [step["name"] for step in study.prepare]


def empty_answers_table(study: Study) -> pd.DataFrame:
    """The share of empty generated answers (`empty_predictions` of each evaluation's summary.json), per cell
    averaged over its finished seeds, and per reference: columns cell, seeds, empty_answers."""
    rows = []
    for cell in study.cells:
        shares = [_summary_value(cell_dir(study, cell, seed), "empty_predictions") for seed in study.seeds]
        shares = [share for share in shares if share is not None]
        if shares:
            rows.append({"cell": cell.name, "seeds": len(shares), "empty_answers": sum(shares) / len(shares)})
    for name in reference_names(study):
        share = _summary_value(reference_dir(study, name), "empty_predictions")
        if share is not None:
            rows.append({"cell": f"{name} (reference)", "seeds": 1, "empty_answers": share})
    return pd.DataFrame(rows, columns=["cell", "seeds", "empty_answers"])


def _summary_value(directory: str, key: str):
    path = os.path.join(directory, "summary.json")
    if not is_done(directory) or not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle).get(key)


def collect_references(study: Study) -> pd.DataFrame:
    """The reference models (prepare steps' models, the cells' other teachers) as scored by the study's evaluation:
    columns cell (the reference's name), example_id, <metrics>; empty when there is none."""
    frames = []
    for name in reference_names(study):
        directory = reference_dir(study, name)
        if is_done(directory):
            frame = _read_scores(directory)
            frame.insert(0, "cell", name)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["cell", "example_id"])


def headline_metric(study: Study, metrics: list[str]) -> str:
    named = getattr(study, "headline_metric", None)
    if named is not None:
        if named not in metrics:
            raise ValueError(f"{study.path}: headline_metric: {named!r} was not scored; scored: {metrics}.")
        return named
    return next((metric for metric in HEADLINE_METRICS if metric in metrics), metrics[0])


def headline_rows(hypothesis: dict, table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the hypothesis's test (Wilcoxon's when it ran both tests): what the headline and the figure read."""
    method = hypothesis.get("method", DEFAULT_TEST)
    if method == "auto":
        return table
    return table[table["method"] == ("wilcoxon" if method == "both" else method)]


def _test_name(hypothesis: dict, rows: pd.DataFrame) -> str:
    """The test(s) behind a headline: `wilcoxon`, or for `auto` with both kinds of metric, both named with why."""
    tests = sorted(set(rows["method"]))
    if len(tests) > 1 and hypothesis.get("method", DEFAULT_TEST) == "auto":
        return "McNemar's exact test on 0/1 item scores, Wilcoxon otherwise"
    return " and ".join(tests)


def headline_line(hypothesis: dict, table: pd.DataFrame, metric: str, alpha: float) -> str:
    """Direction first, treatment against baseline: how many metrics are significantly better and worse, then the
    headline metric's two means and their difference with its interval."""
    rows = headline_rows(hypothesis, table)
    better = int((rows["reject"] & (rows["delta"] > 0)).sum())
    worse = int((rows["reject"] & (rows["delta"] < 0)).sum())
    treatment, baseline = hypothesis["b_cell"], hypothesis["a_cell"]
    name = f"{hypothesis['name']}: " if hypothesis.get("name") else ""
    line = (f"{name}{treatment} better than {baseline} on {better} of {len(rows)} metrics "
            f"({hypothesis.get('correction', 'holm')}-corrected {_test_name(hypothesis, rows)}, α = {alpha}), worse on "
            f"{worse}")
    if metric in set(rows["metric"]):
        row = rows.set_index("metric").loc[metric]
        line += (f"; {metric} {format_value(row['mean_b'])} vs {format_value(row['mean_a'])} (Δ {row['delta']:+.3g}, "
                 f"95% CI [{row['delta_ci_low']:+.3g}, {row['delta_ci_high']:+.3g}]")
        if "mde" in row and math.isfinite(row["mde"]):
            line += f"; n = {int(row['n'])} detects |Δ| ≥ {row['mde']:.3g} at 80% power"
        line += ")"
    return line + "."


def hypothesis_display(hypothesis: dict, table: pd.DataFrame) -> pd.DataFrame:
    """The comparison as read: treatment, baseline, Δ = treatment − baseline with its interval, corrected p, and
    Cohen's d of treatment over baseline."""
    treatment, baseline = hypothesis["b_cell"], hypothesis["a_cell"]
    shown = pd.DataFrame({
        "metric": table["metric"], "test": table["method"], treatment: table["mean_b"], baseline: table["mean_a"],
        "Δ": table["delta"].map(lambda v: f"{v:+.3g}"),
        "Δ 95% CI": [f"[{low:+.3g}, {high:+.3g}]" for low, high in zip(table["delta_ci_low"], table["delta_ci_high"])],
        "p (corrected)": table["p_corr"], "significant": table["reject"], "n": table["n"],
        "detectable Δ (80% power)": [f"±{v:.3g}" if math.isfinite(v) else "" for v in
                                     table.get("mde", pd.Series([math.nan] * len(table)))],
        "Cohen's d": [f"{d:+.3g} [{low:+.3g}, {high:+.3g}]" if math.isfinite(d) else ""
                      for d, low, high in zip(table["cohen_d"], table["ci_low"], table["ci_high"])],
    })
    return shown if table["method"].nunique() > 1 else shown.drop(columns="test")


def _plot_forest(hypotheses, path: str) -> None:
    """One row per metric and comparison: Δ (treatment − baseline) with its 95% interval; filled where significant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for hypothesis, table in hypotheses:
        for _, row in headline_rows(hypothesis, table).iterrows():
            rows.append((f"{row['metric']}  ({hypothesis['b_cell']} − {hypothesis['a_cell']})", row))
    figure, axis = plt.subplots(figsize=(10, max(2.5, 0.32 * len(rows) + 1.2)))
    for position, (label, row) in enumerate(reversed(rows)):
        color = ("#2a9d5b" if row["delta"] > 0 else "#c0392b") if row["reject"] else "#7f7f7f"
        axis.errorbar(row["delta"], position, xerr=[[row["delta"] - row["delta_ci_low"]],
                                                    [row["delta_ci_high"] - row["delta"]]],
                      fmt="o", color=color, mfc=color if row["reject"] else "white", capsize=3)
    axis.axvline(0, color="#444", linewidth=0.8)
    axis.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)], fontsize=8)
    _finish(figure, axis, "Δ = treatment − baseline (95% CI); filled: significant after correction", None,
            "Paired differences against the baseline", path)


def write_report(study: Study) -> str:
    folder = os.path.join(study.output_dir, "report")
    plots = os.path.join(folder, "plots")
    os.makedirs(plots, exist_ok=True)
    scores = collect_scores(study)
    scores.to_csv(os.path.join(folder, "all_scores.csv"), index=False)
    metrics = _metric_columns(scores, study)
    per_example = seed_averaged(scores, metrics)
    summary = summary_table(per_example, metrics)
    summary.insert(1, "reference", False)
    references = collect_references(study)
    if len(references):
        reference_summary = summary_table(references, [m for m in metrics if m in references])
        reference_summary.insert(1, "reference", True)
        summary = pd.concat([summary, reference_summary], ignore_index=True)
    summary.to_csv(os.path.join(folder, "summary.csv"), index=False)
    hypotheses = hypothesis_tables(study, per_example, metrics)
    correlations = correlation_tables(study, scores, metrics)
    analyses = _analyses(study, scores, metrics, plots)
    analyses += task_sections(study, scores, per_example, summary, correlations, _markdown, folder)

    images = []
    if hypotheses:
        path = os.path.join(plots, "paired_differences.png")
        _plot_forest(hypotheses, path)
        images.append(("Paired differences against the baseline (Δ and 95% CI, one row per metric and comparison)",
                       path))
    for metric in metrics:
        path = plot_path(plots, metric)
        _plot_metric(summary, metric, path)
        images.append((f"{metric} by configuration (dashed: the reference models)", path))
    for factor, _ in correlations:
        for metric in metrics:
            path = plot_path(plots, factor, metric)
            _plot_factor(scores, factor, metric, path)
            images.append((f"{metric} against {factor}", path))

    lead = headline_metric(study, metrics)
    headline = [headline_line(hypothesis, table, lead, study.alpha) for hypothesis, table in hypotheses]
    reference_rows = summary[summary["reference"]]
    if len(reference_rows):
        headline.append("Reference (the ceiling): " + "; ".join(
            f"{row['cell']} {lead} {format_value(row[lead])}" for _, row in reference_rows.iterrows()
            if lead in row) + ".")
    with open(os.path.join(folder, "headline.txt"), "w") as handle:
        handle.write("\n".join(headline) + "\n")

    finished = scores.groupby("cell")["seed"].nunique()
    blank_note = ("Blank cells: not computed for that model (agreement and fidelity need a teacher; a reference is a "
                  "teacher) or not scored in every configuration.")
    sections = [f"# Study report: {study.name}\n",
                f"{len(finished)} of {len(study.cells)} cells finished, seeds {study.seeds}; "
                f"{_items(scores)}; α = {study.alpha}. Per-example scores are averaged "
                "over seeds before testing. Tests are paired over examples; Δ is always treatment − baseline.\n"]
    sections.append("## Headline\n\n" + ("\n".join(f"- {line}" for line in headline) if headline
                                        else "No hypotheses were declared.") + "\n")
    means = summary[["cell", "reference", "n", *metrics]].copy()
    means["cell"] = [f"{cell} (reference)" if reference else cell
                     for cell, reference in zip(means["cell"], means["reference"])]
    means = means.drop(columns="reference")
    sections.append("## Mean score per configuration\n\n" + _markdown(means) + f"\n{blank_note} Reference rows are "
                    "the study's prepared models (the teachers), scored the same way. Half-widths of 95% Student-t "
                    "confidence intervals are in `summary.csv` and drawn as error bars.\n")
    empty = empty_answers_table(study)
    if len(empty):
        sections.append("## Empty answers\n\nThe share of generated answers that were empty (the model ended its "
                        "answer at once: an instruct model given plain prompts often does), per configuration; a "
                        "score over empty answers measures the format, not the model.\n\n" + _markdown(empty) + "\n")
    displays = [(hypothesis, table, hypothesis_display(hypothesis, table)) for hypothesis, table in hypotheses]
    for hypothesis, _, shown in displays:
        sections.append(f"## {hypothesis.get('name', 'hypothesis')}: {hypothesis['b_cell']} − {hypothesis['a_cell']}"
                        f"\n\n" + _markdown(shown) + "\n")
    anova = anova_table(per_example, metrics)
    if len(anova):
        sections.append("## Repeated-measures ANOVA across configurations\n\nDo the configurations differ at all? "
                        "Examples are the subjects; p_GG_corr is Greenhouse-Geisser corrected.\n\n"
                        + _markdown(anova) + "\n")
    for factor, table in correlations:
        sections.append(f"## Spearman correlation with {factor}\n\nOver cell × seed means.\n\n"
                        + (_markdown(table) if len(table) else "Too few points for a correlation.\n") + "\n")
    for title, text, _, _ in analyses:
        sections.append(f"## {title}\n\n{text}\n")
    images += [image for _, _, extra, _ in analyses for image in extra]
    sections.append("## Plots\n\n" + "\n".join(f"![{title}](plots/{os.path.basename(path)})" for title, path in images)
                    + "\n")
    markdown = "\n".join(sections)
    with open(os.path.join(folder, "report.md"), "w") as handle:
        handle.write(markdown)
    with open(os.path.join(folder, "report.html"), "w") as handle:
        handle.write(_html(study, means, displays, correlations, images, headline, anova, analyses, blank_note))
    with open(os.path.join(folder, "hypotheses.json"), "w") as handle:
        json.dump([{**h, "table": t.to_dict("records")} for h, t in hypotheses], handle, indent=2, default=str)
    return folder


def _html_table(frame: pd.DataFrame, row_classes: list[str] | None = None) -> str:
    """A table that scrolls sideways when wide; `row_classes` marks rows (`better`, `worse`, `reference`)."""
    head = "".join(f"<th>{html.escape(str(column))}</th>" for column in frame.columns)
    rows = []
    for index, (_, row) in enumerate(frame.iterrows()):
        kind = row_classes[index] if row_classes else ""
        cells = "".join(f"<td>{html.escape(format_value(value, str(column)))}</td>"
                        for column, value in row.items())
        rows.append((f"<tr class='{kind}'>" if kind else "<tr>") + cells + "</tr>")
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"


def _html(study, means, displays, correlations, images, headline, anova, analyses, blank_note) -> str:
    style = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
             ".scroll{overflow-x:auto;max-width:100%}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}th{background:#f3f3f3}"
             "td:first-child{text-align:left}h1{border-bottom:2px solid #4C72B0}tr.better{background:#e3f2e3}"
             "tr.worse{background:#f8e1e0}tr.reference{background:#fdf6dc;font-style:italic}"
             ".headline{font-size:1.05em;background:#f6f8fb;border-left:4px solid #4C72B0;padding:0.6em 1em}"
             "img{max-width:100%;margin:0.5em 0}figure.wide img{width:100%}.note{color:#555;font-size:0.9em}")
    body = [f"<h1>Study report: {html.escape(study.name)}</h1>", "<h2>Headline</h2><div class='headline'><ul>"]
    body += [f"<li>{html.escape(line)}</li>" for line in headline] or ["<li>No hypotheses were declared.</li>"]
    body += ["</ul></div>"]
    wide = [image for image in images if os.path.basename(image[1]) == "paired_differences.png"]
    for title, path in wide:
        body.append(_figure(title, path, "wide"))
    body += ["<h2>Mean score per configuration</h2>",
             _html_table(means, ["reference" if cell.endswith("(reference)") else "" for cell in means["cell"]]),
             f"<p class='note'>{html.escape(blank_note)} Reference rows (in italics) are the study's prepared models "
             "(the teachers), scored the same way.</p>"]
    for hypothesis, table, shown in displays:
        body += [f"<h2>{html.escape(str(hypothesis.get('name', 'hypothesis')))}: "
                 f"{html.escape(hypothesis['b_cell'])} − {html.escape(hypothesis['a_cell'])}</h2>",
                 _html_table(shown, [("better" if delta > 0 else "worse") if significant else ""
                                     for delta, significant in zip(table["delta"], table["reject"])]),
                 "<p class='note'>Δ and Cohen's d are treatment − baseline; green rows are significantly better after "
                 "correction, red rows significantly worse.</p>"]
    if len(anova):
        body += ["<h2>Repeated-measures ANOVA across configurations</h2>", _html_table(anova)]
    for factor, frame in correlations:
        body += [f"<h2>Spearman correlation with {html.escape(factor)}</h2>",
                 _html_table(frame) if len(frame) else "<p>Too few points.</p>"]
    for title, _, _, frames in analyses:
        body.append(f"<h2>{html.escape(title)}</h2>")
        body += [_html_table(frame) for frame in frames if len(frame)] or ["<p>Too few points.</p>"]
    body.append("<h2>Plots</h2>")
    body += [_figure(title, path) for title, path in images if (title, path) not in wide]
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(study.name)}</title>" \
           f"<style>{style}</style></head><body>{''.join(body)}</body></html>"


def _figure(title: str, path: str, kind: str = "") -> str:
    with open(path, "rb") as handle:
        encoded = base64.b64encode(handle.read()).decode()
    return (f"<figure class='{kind}'><img alt=\"{html.escape(title)}\" src=\"data:image/png;base64,{encoded}\">"
            f"<figcaption>{html.escape(title)}</figcaption></figure>")
