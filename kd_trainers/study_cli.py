"""`kd-study STUDY.yaml [--report-only]`: run a study's unfinished cells, evaluate them, and write the report.

A re-run skips finished cells and redoes interrupted ones. `--report-only` rebuilds the report from finished cells.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kd-study", description=__doc__)
    parser.add_argument("study")
    parser.add_argument("--report-only", action="store_true")
    options = parser.parse_args(argv)
    from .study import StudyError, load_study, run_study
    from .study.report import write_report

    try:
        study = load_study(options.study)
    except StudyError as error:
        print(f"Study error: {error}", file=sys.stderr)
        return 2
    folder = write_report(study) if options.report_only else run_study(study)
    print(f"Report: {folder}/report.md and {folder}/report.html")
    with open(f"{folder}/report.md") as handle:
        text = handle.read()
    headline = text.split("## Headline\n\n", 1)[-1].split("\n## ", 1)[0].strip()
    print(headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
