"""The evaluation block shared by recipes (`evaluation:`) and study files: which metrics, on which split, how."""

from __future__ import annotations

import os

from ..runtime.checks import is_positive_integer
from ..runtime.smoke import capped_limit
from ..runtime.suggest import did_you_mean

EVALUATION_KEYS = ("metrics", "answer_extractor", "split", "limit", "max_new_tokens", "batch_size", "judge", "lm_eval")
HARNESS_SUITE = "lm_eval"  # the metric name that runs lm-evaluation-harness tasks (`evaluation.lm_eval` says which)
JUDGE_KEYS = ("model", "url", "endpoint_model", "api_key", "metrics", "context_column")
DEFAULT_JUDGE_METRICS = ("answer_correctness", "answer_similarity", "answer_relevancy")
DEFAULTS = {"metrics": ["ngram"], "answer_extractor": "the_answer_is", "split": "test", "limit": None,
            "max_new_tokens": 64, "batch_size": 16}


def evaluation_settings(block: dict | None, where: str, error: type[ValueError]) -> dict:
    """The block with its defaults, checked: unknown keys (with the closest one), a `judge` metric without a judge,
    `lm_eval` in the metrics without its `lm_eval` block or the other way round. `where`: the recipe or study file
    (a relative `lm_eval.include_path` is taken from its folder)."""
    settings = {**DEFAULTS, **(block or {})}
    for key in settings:
        if key not in EVALUATION_KEYS:
            raise error(f"{where}: evaluation.{key}: unknown key.{did_you_mean(key, EVALUATION_KEYS)}")
    if isinstance(settings["metrics"], str):
        settings["metrics"] = [settings["metrics"]]
    if "judge" in settings["metrics"]:
        judge = settings.get("judge") or {}
        for key in judge:
            if key not in JUDGE_KEYS:
                raise error(f"{where}: evaluation.judge.{key}: unknown key.{did_you_mean(key, JUDGE_KEYS)}")
        if not (judge.get("model") or (judge.get("url") and judge.get("endpoint_model"))):
            raise error(f"{where}: evaluation.metrics has 'judge' but evaluation.judge names no judge: set "
                        "{model: PATH} or {url: http://..., endpoint_model: NAME}.")
    for key in ("limit", "max_new_tokens", "batch_size"):
        value = settings[key]
        if not (value is None and key == "limit") and not is_positive_integer(value):
            raise error(f"{where}: evaluation.{key}: {value!r} should be a positive integer"
                        f"{' (or null for every example)' if key == 'limit' else ''}.")
    if not isinstance(settings["split"], str) or not settings["split"]:
        raise error(f"{where}: evaluation.split: {settings['split']!r} should be the name of a split, e.g. test.")
    if not isinstance(settings["metrics"], list) or not settings["metrics"]:
        raise error(f"{where}: evaluation.metrics: {settings['metrics']!r} should be a list of metric names.")
    if (HARNESS_SUITE in settings["metrics"]) != (settings.get("lm_eval") is not None):
        raise error(f"{where}: evaluation.metrics has lm_eval but there is no evaluation.lm_eval block naming its tasks"
                    ", e.g. lm_eval: {tasks: [arc_easy]}." if HARNESS_SUITE in settings["metrics"] else
                    f"{where}: evaluation.lm_eval is set but evaluation.metrics lacks lm_eval, so it would not run: "
                    "add lm_eval to the metrics, or drop the block.")
    if settings.get("lm_eval") is not None:
        from .harness import harness_settings  # lazy: it imports the demo package; kd-eval's parser imports this

        settings["lm_eval"] = harness_settings(settings["lm_eval"], where, error,
                                               base_dir=os.path.dirname(os.path.abspath(where)))
    # lazy: kd-eval imports this module for its defaults; the metric registry imports pandas
    from .answers import ANSWER_EXTRACTORS  # lazy (see above)
    from .score import resolve_metrics  # lazy (see above)

    if settings["answer_extractor"] not in ANSWER_EXTRACTORS:
        raise error(f"{where}: evaluation.answer_extractor: {settings['answer_extractor']!r} is not one of "
                    f"{sorted(ANSWER_EXTRACTORS)}.{did_you_mean(str(settings['answer_extractor']), ANSWER_EXTRACTORS)}")
    try:
        resolve_metrics(generation_metrics(settings["metrics"]))
    except ValueError as problem:
        raise error(f"{where}: evaluation.metrics: {problem}") from None
    settings["limit"] = capped_limit(settings["limit"])  # a smoke run scores a few examples
    return settings


def generation_metrics(metrics: list[str]) -> list[str]:
    """The metrics scored on generated answers: all but the judge and the lm-eval suite, which run their own way."""
    return [metric for metric in metrics if metric not in ("judge", HARNESS_SUITE)]


def generates_answers(metrics: list[str]) -> bool:
    """Whether the evaluation generates answers on a split (a metric on them, or the judge's); lm-eval alone brings
    its own items, and then no split is read."""
    return bool(generation_metrics(metrics)) or "judge" in metrics
