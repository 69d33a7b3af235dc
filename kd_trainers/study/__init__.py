"""Studies: a grid of recipes, their evaluation and a report with the statistics. `spec.py` (the study file),
`runner.py` (running and resuming cells), `report.py` (tables, tests, plots, report.md and report.html)."""

from .runner import run_study
from .spec import Study, StudyError, load_study


__all__ = ["Study", "StudyError", "load_study", "run_study"]
