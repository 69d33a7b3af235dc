"""`kd-eval`: generate a model's answers on a test split, score them, and write predictions and scores.

    kd-eval --model outputs/vanilla_kd --dataset demo --split test --metrics ngram reasoning \\
            --answer-extractor demo --output outputs/vanilla_kd/eval
    kd-eval --model demo:llama/student/bpe ... --teacher-predictions outputs/teacher-eval/predictions.jsonl

Writes `predictions.jsonl` (inputs, references, predictions), `generation.json` (the generation settings and the
model), `scores.csv` (one row per example, one column per metric) and `summary.json` (means and corpus scores).
`--metrics judge` adds LLM-judge scores (`--judge-model` or `--judge-url` + `--judge-endpoint-model`), and
`judge.json` with the judge's identity and the prompts.
`--metrics lm_eval` scores lm-evaluation-harness tasks (`--lm-eval-tasks`; tasks of your own from
`--lm-eval-include-path DIR`); its items are rows of `scores.csv` (`example_id` `<task>/<doc_id>`, a column
`<task>/<metric>` each), lm-eval's own figures are in `summary.json`, and `lm_eval_results.json` and
`lm_eval_samples.jsonl` keep its results and per-item log. With only `lm_eval`, no dataset is read.

    kd-eval --model outputs/vanilla_kd --metrics lm_eval --lm-eval-tasks kd_demo --output outputs/vanilla_kd/lm_eval
The model is a folder (a full model, or a LoRA adapter, which transformers loads onto its base), a Hub id, or a demo
spec; `--adapter` merges a LoRA adapter into it first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from ..evaluation.settings import DEFAULT_JUDGE_METRICS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", help="the model's tokenizer, when not in the model folder")
    parser.add_argument("--adapter", help="a LoRA adapter merged into the model before generating")
    parser.add_argument("--dataset", default="demo", help="as a recipe's dataset_name")
    parser.add_argument("--dataset-config")
    parser.add_argument("--split", default="test")
    parser.add_argument("--prompt-template")
    parser.add_argument("--columns", type=json.loads, help='JSON renames, e.g. \'{"completion": "answer"}\'')
    parser.add_argument("--limit", type=int, help="score only the first N examples")
    parser.add_argument("--metrics", nargs="+", default=["ngram"])
    parser.add_argument("--answer-extractor", default="the_answer_is")
    parser.add_argument("--teacher-predictions", help="the teacher's predictions.jsonl, for agreement and fidelity")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--do-sample", action="store_true")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--judge-model", help="a local transformers model (path or Hub id) as the LLM judge")
    parser.add_argument("--judge-url", help="an OpenAI-compatible endpoint as the judge, e.g. http://localhost:8000/v1")
    parser.add_argument("--judge-endpoint-model", help="the model name to ask the endpoint for")
    parser.add_argument("--judge-api-key", default=os.environ.get("OPENAI_API_KEY"),
                        help="the endpoint's key (default: $OPENAI_API_KEY); never written to disk")
    parser.add_argument("--judge-metrics", nargs="+", default=list(DEFAULT_JUDGE_METRICS))
    parser.add_argument("--context-column", help="a column with the context, for the faithfulness judge metric")
    parser.add_argument("--lm-eval-tasks", nargs="+", help="lm-eval task, tag or group names (with --metrics lm_eval)")
    parser.add_argument("--lm-eval-include-path", nargs="+", help="folders of lm-eval task YAMLs of your own")
    parser.add_argument("--lm-eval-num-fewshot", type=int, help="few-shot examples per item (default: the task's)")
    parser.add_argument("--lm-eval-limit", type=int, help="score only the first N items of each task")
    parser.add_argument("--lm-eval-batch-size", type=int, default=16)
    parser.add_argument("--output", required=True)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return parser


def harness_options(options) -> dict | None:
    """The `--lm-eval-*` options as the `lm_eval` settings, checked (the task names too, by lm-eval itself); None
    without `--metrics lm_eval`. Errors name the flag."""
    from ..evaluation.harness import check_harness, harness_settings
    from ..evaluation.settings import HARNESS_SUITE

    given = {key: getattr(options, f"lm_eval_{key}") for key in ("tasks", "include_path", "num_fewshot", "limit")}
    if HARNESS_SUITE not in options.metrics:
        named = [f"--lm-eval-{key.replace('_', '-')}" for key, value in given.items() if value is not None]
        if named:
            raise ValueError(f"{', '.join(named)} apply to the lm_eval suite, which --metrics does not name: add "
                             "lm_eval to --metrics.")
        return None
    if not given["tasks"]:
        raise ValueError("--metrics lm_eval needs --lm-eval-tasks TASK [TASK ...] (e.g. arc_easy; the demo's: kd_demo).")
    block = {**{key: value for key, value in given.items() if value is not None},
             "batch_size": options.lm_eval_batch_size}

    def flag(error: Exception) -> ValueError:
        return ValueError(re.sub(r"evaluation\.lm_eval\.(\w+)", lambda m: "--lm-eval-" + m.group(1).replace("_", "-"),
                                 str(error).replace("kd-eval: ", "", 1)))

    try:
        settings = harness_settings(block, "kd-eval", ValueError)
        check_harness(settings, "kd-eval", ValueError)
    except ValueError as error:
        raise flag(error) from None
    return settings


def run_evaluation(options) -> dict:
    """The checks, the data, the model and the teacher's answers of a `kd-eval` command, then the one evaluation
    pipeline (`kd_trainers.evaluation.pipeline.evaluate_model`); returns the summary."""
    from transformers import AutoModelForCausalLM

    from ..evaluation.pipeline import evaluate_model
    from ..evaluation.score import METRICS, resolve_metrics
    from ..evaluation.settings import generates_answers, generation_metrics
    from ..models.generation import load_predictions
    from ..recipe.data import load_recipe_datasets
    from ..recipe.models import resolve_model
    from ..runtime.files import DONE
    from ..recipe.output import RUN_INFO, is_finished
    from ..recipe.preflight import check_model_reference
    from ..runtime.smoke import capped_limit
    from ..teachers.loading import load_teacher

    check_model_reference("--model", options.model, "kd-eval")
    check_model_reference("--tokenizer", options.tokenizer, "kd-eval")
    check_model_reference("--adapter", options.adapter, "kd-eval", adapter=True)
    if os.path.isfile(os.path.join(options.model, RUN_INFO)) and not is_finished(options.model):
        raise ValueError(f"--model: {options.model!r} is a run that did not finish (no {DONE}: it was stopped before "
                         "or during its final save); run its kd-train command again to finish it.")
    if options.teacher_predictions and not os.path.isfile(options.teacher_predictions):
        raise ValueError(f"--teacher-predictions: {options.teacher_predictions!r} does not exist.")
    if os.path.exists(options.output) and not os.path.isdir(options.output):
        raise ValueError(f"--output: {options.output!r} is a file; name a folder.")
    for name in ("limit", "max_new_tokens", "batch_size"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: {value} should be a positive integer.")
    from ..evaluation.answers import ANSWER_EXTRACTORS

    if options.answer_extractor not in ANSWER_EXTRACTORS:
        raise ValueError(f"--answer-extractor: {options.answer_extractor!r} is not one of {sorted(ANSWER_EXTRACTORS)}.")
    use_judge = "judge" in options.metrics
    names = resolve_metrics(generation_metrics(options.metrics))  # bad names fail before any loading
    harness = harness_options(options)
    versus_teacher = [m for m in names if METRICS[m][2] == "teacher_predictions"]
    if versus_teacher and not options.teacher_predictions:
        raise ValueError(f"--metrics: {versus_teacher} compare with the teacher's answers: give "
                         "--teacher-predictions PATH (a teacher's predictions.jsonl from kd-eval).")
    if use_judge and not (options.judge_model or (options.judge_url and options.judge_endpoint_model)):
        raise ValueError("The judge suite needs a judge: --judge-model PATH, or --judge-url URL with "
                         "--judge-endpoint-model NAME.")
    dataset = None
    if generates_answers(options.metrics):
        _, dataset = load_recipe_datasets({"dataset_name": options.dataset, "dataset_config": options.dataset_config,
                                           "dataset_train_split": options.split, "dataset_test_split": options.split,
                                           "columns": options.columns, "prompt_template": options.prompt_template})
    options.limit = capped_limit(options.limit)  # a smoke run scores a few examples
    if options.limit and dataset is not None:
        dataset = dataset.select(range(min(options.limit, len(dataset))))
    teacher = None
    if options.teacher_predictions and dataset is not None:
        teacher = [row["prediction"] for row in load_predictions(options.teacher_predictions)]
        if len(teacher) != len(dataset):
            raise ValueError(f"{options.teacher_predictions} has {len(teacher)} predictions but the split has "
                             f"{len(dataset)} examples (with --limit {options.limit}).")
    model, tokenizer = resolve_model(options.model, options.tokenizer)
    if isinstance(model, str):
        model = AutoModelForCausalLM.from_pretrained(model)
    if options.adapter:
        model = load_teacher(model, None, options.adapter)
    judge = {"model": options.judge_model, "url": options.judge_url, "endpoint_model": options.judge_endpoint_model,
             "api_key": options.judge_api_key, "metrics": options.judge_metrics,
             "context_column": options.context_column}
    _, summary = evaluate_model(
        model, tokenizer, dataset, options.output, metrics=options.metrics, answer_extractor=options.answer_extractor,
        generation={"max_new_tokens": options.max_new_tokens, "do_sample": options.do_sample,
                    "temperature": options.temperature, "top_p": options.top_p},
        batch_size=options.batch_size, teacher_predictions=(lambda prompts: teacher) if teacher else None,
        judge=judge, record={"model": options.model, "adapter": options.adapter, "dataset": options.dataset,
                             "split": options.split}, harness=harness)
    return summary


def main(argv: list[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    from .extras import missing_eval_extra

    missing = missing_eval_extra("kd-eval")
    if missing:
        print(f"kd-eval: {missing}", file=sys.stderr)
        return 2
    from .train import one_line
    from ..runtime.progress import quiet_libraries

    quiet_libraries()

    try:
        summary = run_evaluation(options)
    except (ValueError, OSError) as error:
        if options.debug:
            raise
        print(f"kd-eval: {one_line(error)}", file=sys.stderr)
        return 2
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
    print(f"Predictions and scores in {options.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
