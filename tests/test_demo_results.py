"""The README's demo results are the runs' own: its generated blocks equal what the recorded runs give
(`benchmarks/demo_results.py`), the quickstart's printed figures are the README's, the recorded quickstart is today's
design, and the orderings the README states rest on large, significant effects of the record."""

import importlib.util
import os
import re
import sys

import pytest
import yaml

from kd_trainers.cli.quickstart import write_quickstart_study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("demo_results", os.path.join(ROOT, "benchmarks", "demo_results.py"))
demo_results = importlib.util.module_from_spec(spec)
sys.modules["demo_results"] = demo_results  # its dataclasses look their module up
spec.loader.exec_module(demo_results)


def readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as handle:
        return handle.read()


def test_the_readmes_generated_blocks_are_what_the_records_give():
    text = readme()
    names = [match.group("name") for match in demo_results.BLOCK.finditer(text)]
    assert {"quickstart-table", "quickstart-headline", "label-budget-table", "findings-table"} <= set(names)
    assert demo_results.generated_readme(text) == text, \
        "README.md is stale: python benchmarks/demo_results.py readme"


def figures(line: str) -> list[str]:
    return re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", line)


def test_the_quickstarts_printed_figures_are_the_readmes():
    printed = demo_results.load_record("quickstart")["printed"].splitlines()
    table = next(match.group("body") for match in demo_results.BLOCK.finditer(readme())
                 if match.group("name") == "quickstart-table").splitlines()[2:]
    rows = printed[2:2 + len(table)]
    assert len(rows) == len(table) >= 4
    for shown, row in zip(table, rows):
        cell = shown.split("|")[1].strip()
        assert row.strip().startswith(cell)
        assert figures(shown.split("|", 2)[2]) == figures(row.strip()[len(cell):]), (shown, row)
    headline = printed[printed.index("") + 1:]
    assert "\n".join(f"> {line}" for line in headline) in readme()


def test_the_recorded_quickstart_is_todays_design(tmp_path):
    write_quickstart_study(str(tmp_path))
    assert demo_results.quickstart_design(str(tmp_path)) == demo_results.load_record("quickstart")["design"], \
        "the quickstart's design changed since its run was recorded: run kd-quickstart and record it again"


def test_the_orderings_the_readme_states_are_large_and_significant_in_the_record():
    """What the README's prose says of the quickstart in words: each stated ordering is significant on exact match
    and larger than the smallest difference the design detects at 80 % power."""
    hypotheses = {h["b_cell"]: {r["metric"]: r for r in h["rows"]}
                  for h in demo_results.load_record("quickstart")["hypotheses"]}
    for cell in ("student=seqkd", "student=dskd_cma"):  # "both are worse than the SFT student on exact match"
        row = hypotheses[cell]["exact_match"]
        assert row["reject"] and row["delta"] < 0 and abs(row["delta"]) >= row["mde"], (cell, row)
    means = {m["cell"]: m for m in demo_results.load_record("quickstart")["means"]}
    assert means["teacher"]["exact_match"] > 4 * means["student=sft"]["exact_match"]  # "the teacher is the ceiling"


@pytest.mark.parametrize("name", ["label_budget", "methods", "noise_sweep", "temperature_sweep", "student_size",
                                  "telecom_qa"])
def test_every_study_the_readme_reports_is_recorded_with_its_seeds(name):
    record = demo_results.load_record(name)
    with open(os.path.join(ROOT, "recipes", "studies", f"{name}.yaml")) as handle:
        assert record["seeds"] == yaml.safe_load(handle)["seeds"]
    assert all("mde" in row for test in record["hypotheses"] for row in test["rows"])
