"""Evaluation: per-example metric scores from local `evaluate` modules (`modules/`), final-answer extractors
(`answers.py`), and `score` (`score.py`). A new metric is a module in `modules/` and a line in `score.METRICS`."""

from .answers import ANSWER_EXTRACTORS, reasoning_text
from .score import METRICS, SUITES, score

__all__ = ["ANSWER_EXTRACTORS", "METRICS", "SUITES", "reasoning_text", "score"]
