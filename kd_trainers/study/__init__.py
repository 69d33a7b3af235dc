"""Studies: a grid of recipes, their evaluation and a report with the statistics. `spec.py` (the study file),
`runner.py` (running and resuming cells; the teachers as reference rows), `report.py` (tables, tests, plots, report.md
and report.html), `analyses.py` (ANOVAs, gains, metric correlations) and `tasks.py` (the lm-eval benchmark tasks'
tables)."""

from .runner import run_study
from .spec import Study, StudyError, load_study


__all__ = ["Study", "StudyError", "load_study", "run_study"]
