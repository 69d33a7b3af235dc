"""The one evaluation pipeline: generate a model's answers on a split, score them, and write what was measured.

`kd-eval` (a model given on the command line) and a recipe's or study's evaluation (a finished run) both call
`evaluate_model`; they differ only in where the model, the data and the teacher's answers come from. It writes, into
`directory`:

    predictions.jsonl   example_id, prompt, reference, prediction
    generation.json     the generation settings and what was evaluated
    scores.csv          one row per example, one column per metric (the judge's scores without its replies)
    summary.json        n, the mean of every metric, the corpus-level BLEU/chrF
    judge_replies.csv, judge.json   with the judge: its raw replies, identity and prompts
    lm_eval_results.json, lm_eval_samples.jsonl   with the `lm_eval` suite (`harness.py`): lm-eval's results and its
                        per-item log; its items are rows of scores.csv too (`example_id` `<task>/<doc_id>`, columns
                        `<task>/<metric>`), and its own figures are in summary.json
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable

import pandas as pd

from ..models.generation import empty_share, generate_predictions, save_predictions
from ..data.prompt_completion import prompts_and_references
from .harness import run_harness
from .judge import DEFAULT_JUDGE_METRICS, judge_scores, make_judge, save_judge_record
from .score import METRICS, resolve_metrics, score
from .settings import HARNESS_SUITE, generates_answers, generation_metrics


def evaluate_model(model, tokenizer, dataset, directory: str, *, metrics: list[str], answer_extractor: str,
                   generation: dict, batch_size: int,
                   teacher_predictions: Callable[[list[str]], list[str] | None] | None = None,
                   judge: dict | None = None, record: dict | None = None,
                   harness: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """Evaluates `model` on `dataset` (prompt/completion, plain or conversational, or messages) and writes the files
    above; `summary.json` also holds the share of empty answers (`empty_predictions`).

    Args:
        metrics: names of `score.METRICS` or suites, `judge` for the LLM judge, `lm_eval` for lm-evaluation-harness
            tasks (only `lm_eval`: nothing is generated and `dataset` may be None).
        generation: `max_new_tokens`, and `do_sample`/`temperature`/`top_p` when sampling.
        teacher_predictions: called with the prompts when a metric compares with the teacher (`agreement`,
            `fidelity`); returns the teacher's answers, or None when there is no teacher (those metrics are NaN).
        judge: the judge settings (`model`, or `url` + `endpoint_model`; `api_key`, `metrics`, `context_column`).
        record: more to write into `generation.json` (what model, which split).
        harness: the `lm_eval` settings (`harness.harness_settings`), with `lm_eval` among the metrics.

    Returns `(scores, summary)`: the per-example frame and the summary written to `summary.json`.
    """
    use_judge = "judge" in metrics
    names = resolve_metrics(generation_metrics(metrics))  # unknown names fail before generating
    if HARNESS_SUITE in metrics and not harness:
        raise ValueError("The lm_eval suite needs its settings (harness={'tasks': [...]}).")
    os.makedirs(directory, exist_ok=True)
    frame, summary = (_generated_scores(model, tokenizer, dataset, directory, names, answer_extractor, generation,
                                        batch_size, teacher_predictions, (judge or {}) if use_judge else None,
                                        record)
                      if generates_answers(metrics) else (pd.DataFrame(columns=["example_id"]), {}))
    if HARNESS_SUITE in metrics:
        items, figures = run_harness(model, tokenizer, harness, directory)
        frame = pd.concat([frame, items], ignore_index=True) if len(frame) else items
        summary = {**summary, "lm_eval_items": len(items), **figures}
    frame.to_csv(os.path.join(directory, "scores.csv"), index=False)
    with open(os.path.join(directory, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return frame, summary


def _generated_scores(model, tokenizer, dataset, directory, names, answer_extractor, generation, batch_size,
                      teacher_predictions, judge, record) -> tuple[pd.DataFrame, dict]:
    """The generated answers, scored by the metrics `names` (and the judge when `judge` is given): the frame and the
    summary (n, means, corpus scores)."""
    prompts, references = prompts_and_references(dataset)
    predictions = generate_predictions(model, tokenizer, prompts, batch_size=batch_size, **generation)
    save_predictions(os.path.join(directory, "predictions.jsonl"), prompts, references, predictions,
                     {**generation, "batch_size": batch_size, **(record or {})})

    own = [m for m in names if METRICS[m][2] == "references"]
    frame = score(predictions, references, metrics=own, answer_extractor=answer_extractor)
    corpus = dict(frame.attrs.get("corpus", {}))
    versus_teacher = [m for m in names if METRICS[m][2] == "teacher_predictions"]
    teacher = teacher_predictions(prompts) if versus_teacher and teacher_predictions else None
    if teacher is not None and len(teacher) != len(prompts):
        raise ValueError(f"The teacher's answers are {len(teacher)} for {len(prompts)} examples.")
    for metric in versus_teacher:  # NaN without a teacher (an SFT run)
        frame[metric] = float("nan")
    if teacher is not None:
        with_teacher = score(predictions, references, metrics=versus_teacher, teacher_predictions=teacher,
                             answer_extractor=answer_extractor)
        for metric in versus_teacher:
            frame[metric] = with_teacher[metric]
    judged_metrics = []
    if judge is not None:
        client = make_judge(judge.get("model"), judge.get("url"), judge.get("endpoint_model"),
                            judge.get("api_key") or os.environ.get("OPENAI_API_KEY"))
        contexts = list(dataset[judge["context_column"]]) if judge.get("context_column") else None
        judged = judge_scores(client, predictions, references=references, questions=prompts, contexts=contexts,
                              metrics=judge.get("metrics") or list(DEFAULT_JUDGE_METRICS))
        judged_metrics = [c for c in judged.columns if c.startswith("judge_") and not c.endswith("_reply")]
        frame = frame.merge(judged[["example_id", *judged_metrics]], on="example_id")
        judged.to_csv(os.path.join(directory, "judge_replies.csv"), index=False)
        save_judge_record(judged, os.path.join(directory, "judge.json"))
    summary = {"n": len(predictions), "empty_predictions": empty_share(predictions),
               **{m: float(frame[m].mean()) for m in [*names, *judged_metrics]}, **corpus}
    warn_if_mostly_empty(summary["empty_predictions"], len(predictions), "The evaluated model")
    return frame, summary


def warn_if_mostly_empty(share: float, count: int, who: str) -> None:
    """One warning when more than half of `count` generated answers are empty."""
    if share > 0.5:
        warnings.warn(
            f"{who} answered {round(share * count)} of {count} prompts with nothing (it ended its answer at once): "
            "an instruct model given plain prompts often does. Use conversational data (prompt as chat messages, or "
            "messages) so that its chat template is applied, or a prompt_template it answers.", stacklevel=3)
