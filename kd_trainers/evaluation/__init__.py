"""Evaluation: per-example metric scores from local `evaluate` modules (`modules/`), final-answer extractors
(`answers.py`), `score` (`score.py`), the LLM judge (`judge.py`), the one pipeline that generates, scores and writes
(`pipeline.py`), lm-evaluation-harness tasks scored per item (`harness.py`), the agreement callback (`callbacks.py`)
and the evaluation block's settings (`settings.py`). A new metric is one module in `modules/` with its registration
(`KD_METRICS`, read by `registry.py`); a new benchmark task is an lm-eval task YAML in a folder named by
`lm_eval.include_path`."""

# Eager, not lazy: `score` is both a submodule and the function exported here, and the submodule's import would
# otherwise replace the function on the package.
from .answers import ANSWER_EXTRACTORS, reasoning_text
from .score import METRICS, SUITES, score

__all__ = ["ANSWER_EXTRACTORS", "METRICS", "SUITES", "reasoning_text", "score"]
