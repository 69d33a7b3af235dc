"""The study report: `report.md`, a self-contained `report.html` (plots embedded), PNG plots and CSVs.

Per-example scores of a cell are averaged over its seeds before any test, so that every test pairs the same examples.
"""

from __future__ import annotations

import base64
import json
import math
import os

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from .. import stats
from ..files import DONE
from .analyses import anova_across_levels, gain_table, metric_correlation
from .spec import Cell, Study, cell_dir


def collect_scores(study: Study) -> pd.DataFrame:
    """Every finished cell's per-example scores: columns cell, <factors>, seed, example_id, <metrics>."""
    frames = []
    for cell in study.cells:
        for seed in study.seeds:
            directory = cell_dir(study, cell, seed)
            if not os.path.exists(os.path.join(directory, DONE)):
                continue
            frame = pd.read_csv(os.path.join(directory, "scores.csv"))
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
    """Mean and 95% Student-t confidence-interval half-width per cell and metric, over the seed-averaged examples:
    t_{0.975, n−1} · s / √n (not 1.96, which understates the interval for the few examples of a small study)."""
    rows = []
    for cell, group in per_example.groupby("cell", sort=False):
        row = {"cell": cell, "n": len(group)}
        for metric in metrics:
            values = group[metric].dropna()
            n = len(values)
            half = scipy_stats.t.ppf(0.975, n - 1) * values.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan
            row[metric] = values.mean()
            row[f"{metric}_ci"] = half
        rows.append(row)
    return pd.DataFrame(rows)


def hypothesis_tables(study: Study, scores: pd.DataFrame, per_example: pd.DataFrame, metrics: list[str]
                      ) -> list[tuple[dict, pd.DataFrame]]:
    results = []
    for hypothesis in study.hypotheses:
        names = [Cell({f: str(hypothesis[side][f]) for f in study.factors}, {}).name for side in ("a", "b")]
        usable = [m for m in metrics if scores.loc[scores["cell"].isin(names), m].notna().all()]
        a, b = (per_example.loc[per_example["cell"] == name, ["example_id", *usable]] for name in names)
        table = stats.compare(a, b,
                              metrics=usable, method=hypothesis.get("method", "wilcoxon"),
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
        if data["example_id"].nunique() < 2 or data[metric].std() == 0:
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
                path = os.path.join(plots, f"gain_{treatment}_{against}_{metric}.png")
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
                path = os.path.join(plots, f"scatter_{pair['x']}_{pair['y']}.png")
                _plot_scatter(scores, pair["x"], pair["y"], path)
                images.append((f"{pair['y']} against {pair['x']}", path))
        text = ("Spearman over cell × seed means: do the students that imitate the teacher more also score better?\n\n"
                + (_markdown(table) if len(table) else "Too few points for a correlation.\n"))
        sections.append((title, text, images, [table]))
    return sections


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

    figure, axis = plt.subplots(figsize=(max(4.0, 1.1 * len(summary) + 1.5), 3.2))
    positions = np.arange(len(summary))
    axis.bar(positions, summary[metric], yerr=summary[f"{metric}_ci"].fillna(0), capsize=4, color="#4C72B0",
             alpha=0.85)
    axis.set_xticks(positions, summary["cell"], rotation=20, ha="right", fontsize=8)
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
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _markdown(frame: pd.DataFrame, digits: int = 4) -> str:
    header = "| " + " | ".join(map(str, frame.columns)) + " |\n|" + "---|" * len(frame.columns) + "\n"

    def cell(value):
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.{digits}g}"
        return str(value)

    return header + "".join("| " + " | ".join(cell(v) for v in row) + " |\n" for row in frame.itertuples(index=False))


def write_report(study: Study) -> str:
    folder = os.path.join(study.output_dir, "report")
    plots = os.path.join(folder, "plots")
    os.makedirs(plots, exist_ok=True)
    scores = collect_scores(study)
    scores.to_csv(os.path.join(folder, "all_scores.csv"), index=False)
    metrics = _metric_columns(scores, study)
    per_example = seed_averaged(scores, metrics)
    summary = summary_table(per_example, metrics)
    summary.to_csv(os.path.join(folder, "summary.csv"), index=False)
    hypotheses = hypothesis_tables(study, scores, per_example, metrics)
    correlations = correlation_tables(study, scores, metrics)
    analyses = _analyses(study, scores, metrics, plots)

    images = []
    for metric in metrics:
        path = os.path.join(plots, f"{metric}.png")
        _plot_metric(summary, metric, path)
        images.append((f"{metric} by configuration", path))
    for factor, _ in correlations:
        for metric in metrics:
            path = os.path.join(plots, f"{factor}_{metric}.png")
            _plot_factor(scores, factor, metric, path)
            images.append((f"{metric} against {factor}", path))

    finished = scores.groupby("cell")["seed"].nunique()
    headline = []
    sections = [f"# Study report: {study.name}\n",
                f"{len(finished)} of {len(study.cells)} cells finished, seeds {study.seeds}; "
                f"{scores['example_id'].nunique()} test examples; α = {study.alpha}. Per-example scores are averaged "
                "over seeds before testing. Tests are paired over examples.\n"]
    for hypothesis, table in hypotheses:
        method = hypothesis.get("method", "wilcoxon")
        rejected, total = stats.reject_count(table, method if method != "both" else "wilcoxon")
        better = int((table["mean_b"] > table["mean_a"]).sum()) if method != "both" else None
        headline.append(f"- **{hypothesis.get('name', 'hypothesis')}** ({hypothesis['b_cell']} vs "
                        f"{hypothesis['a_cell']}): {rejected} of {total} metrics reject the null at α = {study.alpha}"
                        f" ({hypothesis.get('correction', 'holm')}-corrected {method})"
                        + (f"; B higher on {better} of {total}." if better is not None else "."))
    sections.append("## Headline\n\n" + ("\n".join(headline) if headline else "No hypotheses were declared.") + "\n")
    means = summary[["cell", "n", *metrics]]
    sections.append("## Mean score per configuration\n\n" + _markdown(means) + "\nHalf-widths of 95% Student-t "
                    "confidence intervals (t quantile with n − 1 degrees of freedom, n examples) are in `summary.csv` "
                    "and drawn as error bars.\n")
    for hypothesis, table in hypotheses:
        sections.append(f"## {hypothesis.get('name', 'hypothesis')}: {hypothesis['b_cell']} vs "
                        f"{hypothesis['a_cell']}\n\n" + _markdown(table) + "\n")
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
        handle.write(_html(study, markdown, summary, means, hypotheses, correlations, images, headline, anova,
                           analyses))
    with open(os.path.join(folder, "hypotheses.json"), "w") as handle:
        json.dump([{**h, "table": t.to_dict("records")} for h, t in hypotheses], handle, indent=2, default=str)
    return folder


def _html(study, markdown, summary, means, hypotheses, correlations, images, headline, anova, analyses) -> str:
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
             "h1{border-bottom:2px solid #4C72B0}.reject{background:#e8f4e8}img{max-width:100%;margin:0.5em 0}")

    def table(frame):
        return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="", border=0)

    body = [f"<h1>Study report: {study.name}</h1>", "<h2>Headline</h2><ul>"]
    body += [f"<li>{line[2:].replace('**', '')}</li>" for line in headline] or ["<li>No hypotheses.</li>"]
    body += ["</ul><h2>Mean score per configuration</h2>", table(means)]
    for hypothesis, frame in hypotheses:
        body += [f"<h2>{hypothesis.get('name', 'hypothesis')}: {hypothesis['b_cell']} vs {hypothesis['a_cell']}</h2>",
                 table(frame)]
    if len(anova):
        body += ["<h2>Repeated-measures ANOVA across configurations</h2>", table(anova)]
    for factor, frame in correlations:
        body += [f"<h2>Spearman correlation with {factor}</h2>", table(frame) if len(frame) else "<p>Too few points.</p>"]
    for title, _, _, frames in analyses:
        body.append(f"<h2>{title}</h2>")
        body += [table(frame) for frame in frames if len(frame)] or ["<p>Too few points.</p>"]
    body.append("<h2>Plots</h2>")
    for title, path in images:
        with open(path, "rb") as handle:
            encoded = base64.b64encode(handle.read()).decode()
        body.append(f'<figure><img alt="{title}" src="data:image/png;base64,{encoded}"><figcaption>{title}'
                    "</figcaption></figure>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{study.name}</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>"
