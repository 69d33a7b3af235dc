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
    parser.add_argument("--workers", type=int, default=1,
                        help="run stages side by side in N processes (the CPU threads split between them; tiny "
                             "models train faster so); default 1")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    options = parser.parse_args(argv)
    if options.workers < 1:
        print(f"Study error: --workers: {options.workers} should be 1 or more.", file=sys.stderr)
        return 2
    from .extras import missing_eval_extra

    missing = missing_eval_extra("kd-study")
    if missing:
        print(f"Study error: {missing}", file=sys.stderr)
        return 2
    from .train import one_line
    from ..runtime.progress import quiet_libraries
    from ..recipe.catalog import resolve
    from ..recipe.schema import RecipeError
    from ..study import StudyError, load_study, run_study
    from ..study.report import write_report

    path = resolve(options.study)
    if path == options.study and not os.path.isfile(path):  # `kd-study methods` for the shipped studies/methods
        path = resolve(f"studies/{options.study}")
    try:
        study = load_study(path)
        if options.report_only:
            folder = write_report(study)
        else:
            quiet_libraries()
            folder = run_study(study, workers=options.workers)  # checks every cell before the first one starts
    except (StudyError, RecipeError, ValueError, OSError) as error:
        if debug:
            raise
        print(f"Study error: {one_line(error)}", file=sys.stderr)
        return 2
    with open(os.path.join(folder, "headline.txt")) as handle:
        print("\n" + handle.read().strip())
    print(f"\nReport: {folder}/report.md and {folder}/report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
