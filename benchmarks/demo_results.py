"""The README's demo results, generated from the runs' own outputs: record a finished run, then write the README.

    python benchmarks/demo_results.py record quickstart OUTPUT_DIR     # a finished `kd-quickstart --output-dir DIR`
    python benchmarks/demo_results.py record STUDY OUTPUT_DIR          # a finished `kd-study STUDY` (its output_dir)
    python benchmarks/demo_results.py readme [--check]                 # README.md's generated blocks, from the records

A record is a small JSON file in `benchmarks/results/demo/` (no per-example scores): the means, every paired
comparison (Δ, interval, corrected p, n, the smallest Δ the design detects at 80 % power), the study's declared
analyses (ANOVA, gain and metric correlations, each with its detectable effect), and, for the quickstart, its design
(the recipes it wrote). `readme` rewrites the blocks of README.md between `<!-- generated: NAME -->` and
`<!-- end generated -->`; `tests/test_demo_results.py` checks that the README equals what the records give, that the
quickstart's printed figures are the README's, and that the recorded quickstart is today's design. Re-record a run
whenever a change moves it (the findings' one-line explanations are in `FINDINGS` below, and are rewritten by hand
when the measurement changes its story).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass

import pandas as pd
import pingouin as pg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = os.path.join(ROOT, "benchmarks", "results", "demo")
README = os.path.join(ROOT, "README.md")
FINDING_METRIC = "exact_match"  # the analytical study's findings are judged on the task's accuracy (as the paper did)
TELECOM_METRIC = "rouge_l"  # the telecom paper's are judged on its own n-gram metric (see the README on when)
POWER = 0.8


# ---------------------------------------------------------------------------------------------------------------------
# Recording

def _hypotheses(report: str) -> list[dict]:
    with open(os.path.join(report, "hypotheses.json")) as handle:
        hypotheses = json.load(handle)
    return [{"name": h["name"], "a_cell": h["a_cell"], "b_cell": h["b_cell"],
             "rows": [{key: row.get(key) for key in ("metric", "method", "n", "mean_a", "mean_b", "delta",
                                                      "delta_ci_low", "delta_ci_high", "p_corr", "reject", "mde")}
                      for row in h["table"]]} for h in hypotheses]


def _means(report: str) -> list[dict]:
    summary = pd.read_csv(os.path.join(report, "summary.csv"))
    metrics = [c for c in summary.columns if c not in ("cell", "reference", "n") and not c.endswith("_ci")]
    return [{"cell": row["cell"], "reference": bool(row["reference"]), "n": int(row["n"]),
             **{m: (None if pd.isna(row[m]) else float(row[m])) for m in metrics}} for _, row in summary.iterrows()]


def _analyses(study) -> dict:
    """The study's declared ANOVAs, gains and metric correlations on the finding metric (and ROUGE-L), each with the
    smallest effect its n detects at 80 % power (pingouin: `power_anova`, `power_corr`)."""
    from kd_trainers.study.analyses import anova_across_levels, gain_table, metric_correlation
    from kd_trainers.study.report import collect_scores

    scores = collect_scores(study)
    metrics = [m for m in (FINDING_METRIC, "rouge_l") if m in scores]
    found = {"anovas": [], "gains": [], "metric_correlations": []}
    for anova in study.anovas:
        table = anova_across_levels(scores, anova["factor"], anova["levels"], metrics)
        for _, row in table.iterrows():
            groups, total = len(anova["levels"]), int(row["ddof1"] + row["ddof2"] + 1)
            eta = pg.power_anova(eta_squared=None, k=groups, n=total // groups, power=POWER, alpha=study.alpha)
            found["anovas"].append({"factor": anova["factor"], "levels": anova["levels"], "metric": row["metric"],
                                    "F": float(row["F"]), "ddof1": int(row["ddof1"]), "ddof2": int(row["ddof2"]),
                                    "p": float(row["p_unc"]), "np2": float(row["np2"]), "detectable_np2": float(eta)})
    for gain in study.gains:
        _, correlations = gain_table(scores, gain["factor"], gain["baseline"], gain["treatment"], gain["against"],
                                     metrics)
        for _, row in correlations.iterrows():
            found["gains"].append({**gain, "metric": row["metric"], "r": float(row["r"]), "p": float(row["p_val"]),
                                   "n": int(row["n"]), "detectable_r": _detectable_r(int(row["n"]), study.alpha)})
    for pair in study.metric_correlations:
        result = metric_correlation(scores, pair["x"], pair["y"])
        if result is not None:
            found["metric_correlations"].append({"x": pair["x"], "y": pair["y"], "r": float(result["r"]),
                                                 "p": float(result["p_val"]), "n": int(result["n"]),
                                                 "detectable_r": _detectable_r(int(result["n"]), study.alpha)})
    return found


def _detectable_r(n: int, alpha: float) -> float:
    return float(pg.power_corr(r=None, n=n, power=POWER, alpha=alpha)) if n > 3 else math.nan


def quickstart_design(output_dir: str) -> dict[str, str]:
    """The recipes and study a quickstart wrote, with its folders written as `<output>` and `<cache>`: what
    `write_quickstart_study` writes today must equal the recorded run's."""
    from kd_trainers.runtime.files import user_cache_dir

    folder = os.path.join(output_dir, "recipes")
    design = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name)) as handle:
            text = handle.read()
        text = text.replace(os.path.abspath(output_dir), "<output>")
        design[name] = text.replace(os.path.dirname(user_cache_dir("prepare")), "<cache>")
    return design


def record(name: str, output_dir: str) -> str:
    report = os.path.join(output_dir, "study", "report") if name == "quickstart" else os.path.join(output_dir, "report")
    values = {"name": name, "means": _means(report), "hypotheses": _hypotheses(report)}
    with open(os.path.join(report, "headline.txt")) as handle:
        values["headline"] = handle.read().strip()
    if name == "quickstart":
        from kd_trainers.cli.quickstart import printed_results

        values["design"] = quickstart_design(output_dir)
        values["printed"] = printed_results(report)  # what the quickstart printed at its end
    else:
        from kd_trainers.study import load_study

        study = load_study(os.path.join(ROOT, "recipes", "studies", f"{name}.yaml"))
        study.output_dir = output_dir
        values["analyses"] = _analyses(study)
        values["seeds"] = study.seeds
    os.makedirs(RECORDS, exist_ok=True)
    path = os.path.join(RECORDS, f"{name}.json")
    with open(path, "w") as handle:
        json.dump(values, handle, indent=1, sort_keys=True)
        handle.write("\n")
    return path


def load_record(name: str) -> dict:
    with open(os.path.join(RECORDS, f"{name}.json")) as handle:
        return json.load(handle)


# ---------------------------------------------------------------------------------------------------------------------
# The README's blocks

def quickstart_table(values: dict) -> str:
    """The quickstart's printed means as a Markdown table (the same columns and figures as it prints)."""
    from kd_trainers.cli.quickstart import format_figure, results_table

    table = results_table(pd.DataFrame(values["means"]))
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join([row["cell"]] + [format_figure(row[c]) for c in table.columns[1:]]) + " |")
    return "\n".join(lines)


def quickstart_headline(values: dict) -> str:
    return "\n".join(f"> {line}" for line in values["headline"].splitlines())


@dataclass(frozen=True)
class Finding:
    """One of the papers' findings, read from one recorded study: a paired comparison (`hypothesis`), a one-way
    ANOVA (`anova`), a gain correlation (`gain`) or a metric correlation (`metric_correlation`, over `x`), with the
    direction the paper reports (`expect`: "positive", "negative" or "none") and a line saying why the demo does or
    does not show it."""

    claim: str
    study: str
    kind: str
    expect: str
    why: str
    hypothesis: str = ""
    x: str = ""
    metric: str = FINDING_METRIC


FINDINGS = [
    Finding("KD beats SFT for small students (analytical)", "methods", "hypothesis", "positive",
            "vanilla KD starts from random, on 240 labels and the teacher's answers to 720 prompts: at 300 steps more "
            "rows cost exact answers, as labels for every prompt do (label-budget study); Rev-KD, started from the "
            "SFT student and so trained 300 steps more, is the one arm above SFT (exact match 0.585, 9 of 10 metrics), "
            "and so is forward-KL KD started there (0.604, the noise and temperature studies)",
            hypothesis="vanilla KD vs SFT"),
    Finding("no difference between KD methods (analytical, one-way ANOVA)", "methods", "anova", "none",
            "Rev-KD (from the SFT student) is far above the others (exact match 0.585 against 0.015 to 0.041); the "
            "design gives it, and GKD, the SFT student's 300 steps as a start, as the GKD paper starts from SFT",),
    Finding("the KD gain falls with student size (analytical, Spearman)", "student_size", "gain", "negative",
            "both arms start from the width's SFT student and train 300 more steps (600 in all); at widths 64 and 96 "
            "KD through the prompts lifts exact match from 0.18 to 0.62 and from 0.17 to 0.65, at width 32 it gains "
            "nothing (0.022 against 0.049): the smallest student, whose SFT answers 5 % exactly, is too small to take "
            "what the teacher gives, so over these widths the gain rises with size; 5 seeds × 3 widths"),
    Finding("teacher-logit noise σ = 1 costs little (analytical)", "noise_sweep", "hypothesis", "none",
            "no metric of 16 differs (exact match 0.611 against 0.604 without noise; σ = 2: 0.600): noise of σ = 1 on "
            "logits whose top token leads by several units rarely changes the softened target", hypothesis="sigma 1 "
            "against no noise"),
    Finding("teacher-logit noise σ = 5 collapses the student (analytical)", "noise_sweep", "hypothesis", "negative",
            "worse on 13 of 16 metrics: exact match falls from 0.604 to 0.396 and agreement from 0.670 to 0.448, a "
            "third of the answers lost rather than a collapse to none", hypothesis="sigma 5 against no noise"),
    Finding("T = 2 beats T = 1 (analytical)", "temperature_sweep", "hypothesis", "negative",
            "no metric of 16 differs (exact match 0.633 at T = 1, 0.604 at T = 2): the trained teacher gives the label "
            "0.98 of its mass on the training rows, so how its small tail is softened changes little",
            hypothesis="T 1 against T 2"),
    Finding("T = 2 beats T = 5 (analytical)", "temperature_sweep", "hypothesis", "negative",
            "no metric of 16 differs (exact match 0.585 at T = 5)", hypothesis="T 5 against T 2"),
    Finding("teacher SFT helps with a shared vocabulary (telecom QA)", "telecom_qa", "hypothesis", "positive",
            "LoRA SFT turns the pretrained teacher from one that does not answer (ROUGE-L 0.083) into one that does "
            "(0.449), and vanilla KD from it is better on 10 of 11 metrics; with DSKD no metric differs (Δ +0.024); "
            "exact match is at its floor (≤ 0.015) for every telecom student", hypothesis="teacher SFT, same "
            "vocabulary, vanilla KD", metric=TELECOM_METRIC),
    Finding("without SFT, a different-vocabulary teacher with DSKD beats vanilla KD (telecom QA)", "telecom_qa",
            "hypothesis", "positive",
            "better on 10 of 11 metrics; DSKD beats vanilla KD from the same-vocabulary teacher too (10 of 11, "
            "ROUGE-L +0.048), so most of the gain is DSKD's, not the other vocabulary's",
            hypothesis="different-vocabulary teacher with DSKD, no SFT", metric=TELECOM_METRIC),
    Finding("SFT of both is best (telecom QA)", "telecom_qa", "hypothesis", "positive",
            "better on 4 of 11 metrics (chrF, embedding cosine, BERTScore recall and F1), none worse; on ROUGE-L "
            "the gain (+0.023) is below what 90 questions detect after Holm",
            hypothesis="SFT of both, different vocabulary, DSKD", metric=TELECOM_METRIC),
    Finding("agreement does not track accuracy (analytical)", "methods", "metric_correlation", "none",
            "students that agree more with the teacher score higher: the teacher answers 69 % of the questions "
            "exactly, so agreeing with it is mostly being right", x="agreement"),
]


def _fmt(value, digits: str = ".3g", sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return format(value, ("+" if sign else "") + digits)


def _p(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3g}"


def _verdict(expect: str, significant: bool, direction: float) -> str:
    """Reproduces: the paper's direction, significant; for a claim of no effect, no significant effect, which says
    only that none is larger than the detectable one (the column beside it)."""
    if expect == "none":
        return "yes: none beyond the detectable effect" if not significant else "no: an effect is found"
    wanted = direction > 0 if expect == "positive" else direction < 0
    if significant:
        return "yes" if wanted else "no: the opposite, significant"
    return "no: not significant"


def finding_row(finding: Finding, values: dict) -> list[str]:
    """`[claim, effect and interval, p, n, detectable at 80 % power, reproduces, why]` of one finding."""
    metric = finding.metric
    if finding.kind == "hypothesis":
        test = next(h for h in values["hypotheses"] if h["name"] == finding.hypothesis)
        row = next(r for r in test["rows"] if r["metric"] == metric)
        better = sum(r["reject"] and r["delta"] > 0 for r in test["rows"])
        worse = sum(r["reject"] and r["delta"] < 0 for r in test["rows"])
        effect = (f"{test['b_cell']} − {test['a_cell']}: {metric} {_fmt(row['mean_b'])} vs {_fmt(row['mean_a'])}, "
                  f"Δ {_fmt(row['delta'], sign=True)} [{_fmt(row['delta_ci_low'], sign=True)}, "
                  f"{_fmt(row['delta_ci_high'], sign=True)}] ({row['method']}); better on {better}, worse on {worse} "
                  f"of {len(test['rows'])} metrics")
        power = f"Δ of ±{_fmt(row['mde'])}"
        p, n = _p(row["p_corr"]), f"{row['n']} questions × {len(values['seeds'])} seeds"
        verdict = _verdict(finding.expect, bool(row["reject"]), row["delta"])
    elif finding.kind == "anova":
        row = next(r for r in values["analyses"]["anovas"] if r["metric"] == metric)
        effect = (f"{metric} across {', '.join(row['levels'])}: F({row['ddof1']}, {row['ddof2']}) = "
                  f"{_fmt(row['F'])}, η²p = {_fmt(row['np2'])}")
        power, p, n = f"η²p ≥ {_fmt(row['detectable_np2'])}", _p(row["p"]), f"{row['ddof1'] + row['ddof2'] + 1}"
        verdict = _verdict("none", row["p"] < 0.05, 0.0)
    else:
        rows = values["analyses"]["gains" if finding.kind == "gain" else "metric_correlations"]
        row = next(r for r in rows if r.get("metric", r.get("y")) == metric and (finding.kind == "gain" or
                                                                                  r["x"] == finding.x))
        what = (f"gain of {row['treatment']} over {row['baseline']} in {metric} against {row['against']}"
                if finding.kind == "gain" else f"{row['x']} vs {row['y']} over cell × seed means")
        effect = f"{what}: Spearman r = {_fmt(row['r'], sign=True)}"
        power, p, n = f"r of ±{_fmt(row['detectable_r'])}", _p(row["p"]), str(row["n"])
        verdict = _verdict(finding.expect, row["p"] < 0.05, row["r"])
    return [finding.claim, effect, p, n, power, verdict, finding.why]


def findings_table() -> str:
    lines = ["| finding (paper) | what the demo measured | p | n | detectable at 80 % power | reproduces | why |",
             "|---|---|---|---|---|---|---|"]
    for finding in FINDINGS:
        path = os.path.join(RECORDS, f"{finding.study}.json")
        if not os.path.exists(path):
            lines.append(f"| {finding.claim} | not recorded yet: `kd-study {finding.study} --workers 2`, then "
                         f"`python benchmarks/demo_results.py record {finding.study} OUTPUT_DIR` | | | | | |")
            continue
        lines.append("| " + " | ".join(finding_row(finding, load_record(finding.study))) + " |")
    return "\n".join(lines)


def arms_table(study: str, baseline_label: str) -> str:
    """A study's paired tests, one row each, on the finding metric: the two means, Δ with its interval, the
    corrected p, what the comparison could detect and how many metrics moved either way; then its one-way ANOVAs
    and its references."""
    path = os.path.join(RECORDS, f"{study}.json")
    if not os.path.exists(path):
        return f"Not recorded yet: `kd-study {study} --workers 2`, then record it."
    values = load_record(study)
    lines = [f"| {baseline_label} | {FINDING_METRIC} | Δ [95 % CI] | p (Holm) | "
             "detectable Δ (80 % power) | metrics better / worse |", "|---|---|---|---|---|---|"]
    for test in values["hypotheses"]:
        row = next(r for r in test["rows"] if r["metric"] == FINDING_METRIC)
        better = sum(r["reject"] and r["delta"] > 0 for r in test["rows"])
        worse = sum(r["reject"] and r["delta"] < 0 for r in test["rows"])
        lines.append(f"| {test['name']} | {_fmt(row['mean_b'])} vs {_fmt(row['mean_a'])} | "
                     f"{_fmt(row['delta'], sign=True)} [{_fmt(row['delta_ci_low'], sign=True)}, "
                     f"{_fmt(row['delta_ci_high'], sign=True)}] | {_p(row['p_corr'])} | ±{_fmt(row['mde'])} | "
                     f"{better} / {worse} of {len(test['rows'])} |")
    anovas = values["analyses"].get("anovas", [])
    if anovas:
        lines.append("")
        levels = ", ".join(anovas[0]["levels"])
        lines.append(f"One-way ANOVA across {anovas[0]['factor']} ∈ {{{levels}}}: " + "; ".join(
            f"{a['metric']} F = {_fmt(a['F'])}, p {'' if a['p'] < 0.001 else '= '}{_p(a['p'])}" for a in anovas
            if a["metric"] in (FINDING_METRIC, "rouge_l")) + ".")
    references = [m for m in values["means"] if m["reference"]]
    lines.append("")
    lines.append("References: " + "; ".join(f"{m['cell']} {FINDING_METRIC} {_fmt(m.get(FINDING_METRIC))}"
                                            for m in references) + ".")
    return "\n".join(lines)


def label_budget_table() -> str:
    """The label-budget study (the quickstart's design in full): every arm against SFT on the finding metric."""
    return arms_table("label_budget", "arm against SFT (240 labels)")


def cross_tokenizer_table() -> str:
    """The cross-tokenizer study: each method against SFT and against CE on the same rows, and GOLD against ULD."""
    return arms_table("cross_tokenizer", "comparison (treatment vs baseline)")


BLOCKS = {
    "quickstart-table": lambda: quickstart_table(load_record("quickstart")),
    "quickstart-headline": lambda: quickstart_headline(load_record("quickstart")),
    "label-budget-table": label_budget_table,
    "cross-tokenizer-table": cross_tokenizer_table,
    "findings-table": findings_table,
}
# A block: its opening line, its body (whole lines, no other marker), its closing line.
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>(?:(?!<!-- )[^\n]*\n)*?)(<!-- end generated -->)")


def generated_readme(text: str) -> str:
    """`text` (README.md) with every generated block rewritten from the records."""
    unknown = [m.group("name") for m in BLOCK.finditer(text) if m.group("name") not in BLOCKS]
    if unknown:
        raise ValueError(f"README.md names generated blocks {unknown} that {__file__} does not make.")
    return BLOCK.sub(lambda m: m.group(1) + BLOCKS[m.group("name")]().rstrip("\n") + "\n" + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    recording = commands.add_parser("record")
    recording.add_argument("name", help="quickstart, or a shipped study's name (methods, label_budget, ...)")
    recording.add_argument("output_dir")
    readme = commands.add_parser("readme")
    readme.add_argument("--check", action="store_true", help="exit 1 if README.md is not what the records give")
    options = parser.parse_args(argv)
    if options.command == "record":
        print(f"Recorded {record(options.name, options.output_dir)}")
        return 0
    with open(README) as handle:
        text = handle.read()
    generated = generated_readme(text)
    if options.check:
        if generated != text:
            print("README.md differs from its records: python benchmarks/demo_results.py readme", file=sys.stderr)
            return 1
        return 0
    with open(README, "w") as handle:
        handle.write(generated)
    print("README.md rewritten from benchmarks/results/demo/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
