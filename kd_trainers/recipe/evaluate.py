"""Evaluating a trained recipe: its student on the recipe's test split, and its teacher for agreement and fidelity.

The models come from a trainer still in memory (a one-process run), or from the run's output folder when the run was
launched in other processes (a recipe with an `accelerate` block): `kd-train` and the study runner then evaluate in
the launching process, once training has ended, from what the run saved.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
from transformers import AutoModelForCausalLM

from ..evaluation.pipeline import evaluate_model
from ..evaluation.settings import generates_answers
from ..runtime.files import DONE, write_done
from ..models.generation import generate_predictions, save_predictions
from ..data.prompt_completion import check_generation_format
from ..teachers.loading import dtype_from_init_kwargs, load_teacher
from ..models.tokenizer import load_tokenizer
from .data import load_recipe_datasets
from .models import resolve_student, resolve_teacher


@dataclass
class TrainedModels:
    """The trained student with its tokenizer, and a loader for the frozen teacher (None without one: SFT)."""

    model: object
    tokenizer: object
    load_teacher: Callable[[], tuple[object, object]] | None

    @classmethod
    def from_trainer(cls, trainer) -> TrainedModels:
        teacher = getattr(trainer, "teacher_model", None)

        def loader():
            return trainer.accelerator.unwrap_model(teacher), trainer.teacher_processing_class

        return cls(trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class,
                   loader if teacher is not None else None)

    @classmethod
    def from_output(cls, recipe) -> TrainedModels:
        """The models of a finished run, loaded from `recipe.config.output_dir` (a full model, or a LoRA adapter that
        is merged onto the base the run started from) and from the teacher the recipe names."""

        config = recipe.config
        output = config.output_dir
        init_kwargs = config.model_init_kwargs if isinstance(config.model_init_kwargs, dict) else {}
        base, tokenizer = resolve_student(recipe)
        if os.path.exists(os.path.join(output, "adapter_config.json")):
            # A LoRA run saved only its adapter: put it back on the base it trained from.
            model = load_teacher(base, init_kwargs if isinstance(base, str) else None, output)
        else:
            model = AutoModelForCausalLM.from_pretrained(output, **dtype_from_init_kwargs(init_kwargs))
        if os.path.exists(os.path.join(output, "tokenizer_config.json")):
            tokenizer = load_tokenizer(output)

        return cls(model, tokenizer, (lambda: load_recipe_teacher(recipe)) if recipe.needs_teacher else None)


def load_recipe_teacher(recipe) -> tuple[object, object]:
    """`(teacher, its tokenizer)` as the recipe names them: loaded with its init kwargs, its adapter merged."""
    config = recipe.config
    teacher, teacher_tokenizer = resolve_teacher(recipe)
    teacher_kwargs = getattr(config, "teacher_model_init_kwargs", None)
    teacher = load_teacher(teacher, teacher_kwargs if isinstance(teacher, str) and isinstance(teacher_kwargs, dict)
                           else None, config.teacher_adapter_name_or_path)
    return teacher, teacher_tokenizer


def teacher_identity(recipe) -> dict:
    """What a recipe's teacher (and so its answers) is made of: the model, its adapter, load settings, tokenizer."""
    config = recipe.config
    return {"teacher": config.teacher_model_name_or_path, "adapter": config.teacher_adapter_name_or_path,
            "init_kwargs": getattr(config, "teacher_model_init_kwargs", None),
            "tokenizer": getattr(config, "teacher_tokenizer_name_or_path", None)}


def evaluation_split(recipe, split: str, limit: int | None, key: str = "evaluation.split"):
    """The recipe's dataset split to evaluate on, with its columns mapped, cut to `limit` examples. `key` names the
    setting in errors (`evaluation.split`, `agreement.split`)."""
    options = {**recipe.options, "dataset_train_split": split, "dataset_test_split": None}
    try:
        dataset, _ = load_recipe_datasets(options)
    except ValueError as error:
        raise ValueError(str(error).replace("dataset_train_split:", f"{key}:", 1)) from None
    return dataset.select(range(min(limit, len(dataset)))) if limit else dataset


def check_evaluation_splits(recipe, tokenizer=None) -> None:
    """The evaluation's and agreement's splits load and can be given to a model as prompts (a response boundary
    per row; messages only with a tokenizer that has a chat template, when `tokenizer` is given): a recipe that
    cannot be evaluated is refused before training, not after it."""
    for key in ("evaluation", "agreement"):
        block = recipe.options[key]
        if block and (key == "agreement" or generates_answers(block["metrics"])):
            split = evaluation_split(recipe, block["split"], 1, key=f"{key}.split")
            check_generation_format(split, tokenizer, f"{key}.split {block['split']!r}")


def _teacher_cache(evaluation: dict, cache_root: str, recipe, prompts: list[str]) -> tuple[str, str]:
    """`(folder, key)` of a teacher's cached answers: keyed by everything they depend on, the teacher (name, adapter,
    load settings, tokenizer), the prompts' content (not their number: two test sets of the same size are different
    sets) and every generation setting (the batch size too: left padding can change a greedy continuation)."""
    key = json.dumps({
        **teacher_identity(recipe),
        "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
        "generation": {"max_new_tokens": evaluation["max_new_tokens"], "do_sample": False,
                       "batch_size": evaluation["batch_size"]},
    }, sort_keys=True, default=str)
    return os.path.join(cache_root, "teachers", hashlib.sha256(key.encode()).hexdigest()[:12]), key


def store_teacher_predictions(evaluation: dict, cache_root: str, recipe, prompts: list[str],
                              predictions: list[str]) -> None:
    """The recipe's teacher's answers, generated elsewhere with the evaluation's settings (a study's teacher reference),
    put where `teacher_predictions` finds them: the cells then compare with them without generating them again."""
    folder, key = _teacher_cache(evaluation, cache_root, recipe, prompts)
    os.makedirs(folder, exist_ok=True)
    save_predictions(os.path.join(folder, "predictions.jsonl"), prompts, [""] * len(prompts), predictions,
                     {"teacher": key})
    write_done(folder, {"teacher": key})


def teacher_predictions(evaluation: dict, cache_root: str, trained: TrainedModels, recipe,
                        prompts: list[str]) -> list[str] | None:
    """The teacher's answers on the test prompts, generated once per distinct teacher and cached under `cache_root`
    (the teacher is only loaded when its answers are not cached yet)."""
    if trained.load_teacher is None:
        return None
    folder, _ = _teacher_cache(evaluation, cache_root, recipe, prompts)
    if os.path.exists(os.path.join(folder, DONE)):
        with open(os.path.join(folder, "predictions.jsonl")) as handle:
            return [json.loads(line)["prediction"] for line in handle]
    teacher, teacher_tokenizer = trained.load_teacher()
    predictions = generate_predictions(teacher, teacher_tokenizer, prompts, batch_size=evaluation["batch_size"],
                                       max_new_tokens=evaluation["max_new_tokens"])
    store_teacher_predictions(evaluation, cache_root, recipe, prompts, predictions)
    return predictions


def evaluate_trained(evaluation: dict, trained: TrainedModels, recipe, directory: str,
                     cache_root: str) -> pd.DataFrame:
    """The recipe's `evaluation` settings on its trained model, through the one evaluation pipeline
    (`kd_trainers.evaluation.pipeline.evaluate_model`): the recipe's test split, the teacher's cached answers."""
    dataset = (evaluation_split(recipe, evaluation["split"], evaluation["limit"])
               if generates_answers(evaluation["metrics"]) else None)
    frame, _ = evaluate_model(
        trained.model, trained.tokenizer, dataset, directory, metrics=evaluation["metrics"],
        answer_extractor=evaluation["answer_extractor"], generation={"max_new_tokens": evaluation["max_new_tokens"]},
        batch_size=evaluation["batch_size"],
        teacher_predictions=lambda prompts: teacher_predictions(evaluation, cache_root, trained, recipe, prompts),
        judge=evaluation.get("judge"), record={"split": evaluation["split"]}, harness=evaluation.get("lm_eval"))
    return frame
