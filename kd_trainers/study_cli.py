"""`kd-study STUDY.yaml [--report-only]`: run a study's unfinished cells, evaluate them, and write the report.

A re-run skips finished cells and redoes interrupted ones. `--report-only` rebuilds the report from finished cells.
STUDY is a file or a shipped study's name (`kd-study methods`; `kd-train list` shows them).
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = argparse.ArgumentParser(prog="kd-study", description=__doc__)
    parser.add_argument("study")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    options = parser.parse_args(argv)
    from .cli import one_line
    from .recipe.schema import RecipeError
    from .study import StudyError, load_study, run_study
    from .study.report import write_report
    from .study.runner import check_study

    from .recipe.catalog import resolve

    path = resolve(options.study)
    if path == options.study and not os.path.isfile(path):  # `kd-study methods` for the shipped studies/methods
        path = resolve(f"studies/{options.study}")
    try:
        study = load_study(path)
        if options.report_only:
            folder = write_report(study)
        else:
            check_study(study)  # every cell, before the first one starts
            folder = run_study(study)
    except (StudyError, RecipeError, ValueError, OSError) as error:
        if debug:
            raise
        print(f"Study error: {one_line(error)}", file=sys.stderr)
        return 2
    print(f"Report: {folder}/report.md and {folder}/report.html")
    with open(f"{folder}/report.md") as handle:
        text = handle.read()
    headline = text.split("## Headline\n\n", 1)[-1].split("\n## ", 1)[0].strip()
    print(headline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
