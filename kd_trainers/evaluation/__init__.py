"""Evaluation: per-example metric scores from local `evaluate` modules (`modules/`), final-answer extractors
(`answers.py`), `score` (`score.py`), the LLM judge (`judge.py`), the one pipeline that generates, scores and writes
(`pipeline.py`), the agreement callback (`callbacks.py`) and the evaluation block's settings (`settings.py`). A new
metric is a module in `modules/` and a line in `score.METRICS`."""

from ..lazy import lazy_getattr

# Loaded on first use: `kd-eval --help` and the settings checks do not import pandas and the metric libraries.
_EXPORTS = {"ANSWER_EXTRACTORS": ".answers", "reasoning_text": ".answers", "METRICS": ".score", "SUITES": ".score",
            "score": ".score"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
