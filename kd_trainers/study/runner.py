"""Running a study: the prepare steps, every cell × seed as an ordinary recipe run, its evaluation, then the report.

Resumable: a finished step or cell has a `done.json`, written last (atomically), and is skipped on a re-run. A cell
without it is run again: its training resumes from its last complete checkpoint (see `kd_trainers.checkpointing`) and
its evaluation is redone from scratch, so partial results are never mixed in.
"""

from __future__ import annotations

import hashlib
import json
import os

import pandas as pd

from ..evaluation.generate import generate_predictions, save_predictions
from ..evaluation.judge import DEFAULT_JUDGE_METRICS, judge_scores, make_judge, save_judge_record
from ..evaluation.score import METRICS, resolve_metrics, score
from ..recipe.data import load_recipe_datasets
from ..recipe.run import run_recipe
from ..recipe.schema import load_recipe
from .spec import Cell, Study

DONE = "done.json"


def _write_done(directory: str, info: dict) -> None:
    temporary = os.path.join(directory, DONE + ".tmp")
    with open(temporary, "w") as handle:
        json.dump(info, handle, indent=2)
    os.replace(temporary, os.path.join(directory, DONE))


def _as_overrides(values: dict, prepared: dict[str, str]) -> list[str]:
    """`{key: value}` -> `["key=<json>"]`, with `{prepare.NAME}` in strings replaced by that step's output folder."""
    result = []
    for key, value in values.items():
        if isinstance(value, str):
            for name, folder in prepared.items():
                value = value.replace("{prepare." + name + "}", folder)
        result.append(f"{key}={json.dumps(value)}")
    return result


def cell_dir(study: Study, cell: Cell, seed: int) -> str:
    safe = cell.name.replace("/", "_").replace(",", "__").replace("=", "-")
    return os.path.join(study.output_dir, "cells", safe, f"seed{seed}")


def _test_split(recipe, split: str, limit: int | None):
    """The recipe's dataset split to evaluate on, with its columns mapped, cut to `limit` examples."""
    options = {**recipe.options, "dataset_train_split": split, "dataset_test_split": None}
    dataset, _ = load_recipe_datasets(options)
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def _teacher_predictions(evaluation: dict, cache_root: str, trainer, recipe, prompts: list[str]) -> list[str] | None:
    """The teacher's answers on the test prompts, generated once per distinct teacher and cached under `cache_root`."""
    teacher = getattr(trainer, "teacher_model", None)
    if teacher is None:
        return None
    key = json.dumps([recipe.config.teacher_model_name_or_path, recipe.config.teacher_adapter_name_or_path,
                      len(prompts), evaluation["max_new_tokens"]])
    folder = os.path.join(cache_root, "teachers", hashlib.sha256(key.encode()).hexdigest()[:12])
    path = os.path.join(folder, "predictions.jsonl")
    if os.path.exists(os.path.join(folder, DONE)):
        with open(path) as handle:
            return [json.loads(line)["prediction"] for line in handle]
    os.makedirs(folder, exist_ok=True)
    predictions = generate_predictions(trainer.accelerator.unwrap_model(teacher), trainer.teacher_processing_class,
                                       prompts, batch_size=evaluation["batch_size"],
                                       max_new_tokens=evaluation["max_new_tokens"])
    save_predictions(path, prompts, [""] * len(prompts), predictions, {"teacher": key})
    _write_done(folder, {"teacher": key})
    return predictions


def evaluate_cell(study: Study, trainer, recipe, directory: str) -> pd.DataFrame:
    return evaluate_trained(study.evaluation, trainer, recipe, directory, cache_root=study.output_dir)


def evaluate_trained(evaluation: dict, trainer, recipe, directory: str, cache_root: str) -> pd.DataFrame:
    """Generates on the recipe's test split with the trained model, scores it (see `evaluation_settings`), and writes
    `predictions.jsonl`, `generation.json` and `scores.csv` (plus the judge's files) into `directory`."""
    os.makedirs(directory, exist_ok=True)
    dataset = _test_split(recipe, evaluation["split"], evaluation["limit"])
    prompts, references = list(dataset["prompt"]), list(dataset["completion"])
    model = trainer.accelerator.unwrap_model(trainer.model)
    predictions = generate_predictions(model, trainer.processing_class, prompts, batch_size=evaluation["batch_size"],
                                       max_new_tokens=evaluation["max_new_tokens"])
    save_predictions(os.path.join(directory, "predictions.jsonl"), prompts, references, predictions,
                     {"max_new_tokens": evaluation["max_new_tokens"], "do_sample": False})
    metrics = resolve_metrics([m for m in evaluation["metrics"] if m != "judge"])
    own = [m for m in metrics if METRICS[m][2] == "references"]
    frame = score(predictions, references, metrics=own, answer_extractor=evaluation["answer_extractor"])
    versus_teacher = [m for m in metrics if METRICS[m][2] == "teacher_predictions"]
    for metric in versus_teacher:  # NaN for a cell without a teacher (SFT)
        frame[metric] = float("nan")
    teacher = _teacher_predictions(evaluation, cache_root, trainer, recipe, prompts) if versus_teacher else None
    if teacher is not None:
        with_teacher = score(predictions, references, metrics=versus_teacher, teacher_predictions=teacher,
                             answer_extractor=evaluation["answer_extractor"])
        for metric in versus_teacher:
            frame[metric] = with_teacher[metric]
    if "judge" in evaluation["metrics"]:
        settings = evaluation["judge"]
        judge = make_judge(settings.get("model"), settings.get("url"), settings.get("endpoint_model"),
                           settings.get("api_key"))
        contexts = list(dataset[settings["context_column"]]) if settings.get("context_column") else None
        judged = judge_scores(judge, predictions, references=references, questions=prompts, contexts=contexts,
                              metrics=settings.get("metrics", DEFAULT_JUDGE_METRICS))
        frame = frame.merge(judged[[c for c in judged.columns if not c.endswith("_reply")]], on="example_id")
        judged.to_csv(os.path.join(directory, "judge_replies.csv"), index=False)
        save_judge_record(judged, os.path.join(directory, "judge.json"))
    frame.to_csv(os.path.join(directory, "scores.csv"), index=False)
    return frame


def run_study(study: Study, log=print) -> str:
    """Runs what is not finished yet, then writes the report; returns the report folder."""
    from .report import write_report

    prepared = {}
    for step in study.prepare:
        folder = os.path.abspath(os.path.join(study.output_dir, "prepare", step["name"]))
        prepared[step["name"]] = folder
        if os.path.exists(os.path.join(folder, DONE)):
            log(f"[study] prepare {step['name']}: done, skipped")
            continue
        recipe_path = step["recipe"] if os.path.isabs(step["recipe"]) else os.path.join(
            os.path.dirname(os.path.abspath(study.path)), step["recipe"])
        log(f"[study] prepare {step['name']}: {recipe_path}")
        run_recipe(load_recipe(recipe_path, _as_overrides({**step.get("overrides", {}), "output_dir": folder},
                                                          prepared)))
        _write_done(folder, {"recipe": recipe_path})

    for cell in study.cells:
        for seed in study.seeds:
            directory = cell_dir(study, cell, seed)
            if os.path.exists(os.path.join(directory, DONE)):
                log(f"[study] {cell.name} seed {seed}: done, skipped")
                continue
            os.makedirs(directory, exist_ok=True)
            log(f"[study] {cell.name} seed {seed}: training and evaluating")
            values = {**study.overrides, **cell.overrides, "seed": seed,
                      "output_dir": os.path.join(directory, "train")}
            recipe = load_recipe(cell.recipe or study.base_recipe, _as_overrides(values, prepared))
            trainer = run_recipe(recipe)
            evaluate_cell(study, trainer, recipe, directory)
            _write_done(directory, {"cell": cell.name, "levels": cell.levels, "seed": seed,
                                    "overrides": values})
    return write_report(study)
