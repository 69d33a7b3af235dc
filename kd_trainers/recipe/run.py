"""Running a validated recipe: models, tokenizers and data, the trainer, resume, the final save and publishing."""

from __future__ import annotations

import json
import os
import platform
import sys

import accelerate
import datasets
import peft
import torch
import transformers
import trl
import yaml
from peft import LoraConfig
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .. import __version__
from ..evaluation.callbacks import AgreementCallback
from ..runtime.files import write_atomically, write_done
from .publish import build_publish_folder, upload
from ..runtime.redaction import redact, redact_arguments
from .training_rows import trainer_data_kwargs, training_data
from .evaluate import TrainedModels, check_evaluation_splits, evaluate_trained, evaluation_split
from .models import resolve_model, resolve_student, resolve_teacher, resolve_tokenizer, served_model_name
from .output import (RUN_INFO, check_output_dir, intact_checkpoint, is_finished, run_settings, save_final,
                     start_over_if_asked)
from .schema import Recipe


def apply_env(options: dict) -> None:
    """The recipe's `env` block into this process's environment (and so into any process it launches)."""
    for key, value in (options["env"] or {}).items():
        os.environ[key] = str(value)


def write_run_info(recipe: Recipe, resumed_from: str | None, trainer=None) -> None:
    """The resolved recipe, the settings the model is made with, package versions and seed, in the output folder
    (main process only), and the teacher the `trainer` distils from (a teacher cache: its key and settings). Secrets
    (`hub_token`, a judge's `api_key`) are redacted."""

    output_dir = recipe.config.output_dir
    os.makedirs(output_dir, exist_ok=True)
    text = f"# Resolved from {recipe.path} (with command-line overrides).\n" + yaml.safe_dump(
        redact(recipe.raw), sort_keys=False)
    write_atomically(os.path.join(output_dir, "recipe.yaml"), text)
    info = {
        "recipe": os.path.abspath(recipe.path), "command": redact_arguments(sys.argv), "seed": recipe.config.seed,
        "resumed_from": resumed_from, "python": platform.python_version(),
        "versions": {"kd_trainers": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "trl": trl.__version__, "peft": peft.__version__, "accelerate": accelerate.__version__,
                     "datasets": datasets.__version__},
        "settings": redact(run_settings(recipe)),
    }
    if getattr(trainer, "teacher_name", None):
        info["teacher"] = trainer.teacher_name
    if getattr(trainer, "teacher", None) is not None:  # a cache's key and settings, a server's, several teachers
        info.update(trainer.teacher.describe().run_info)
    write_atomically(os.path.join(output_dir, RUN_INFO), json.dumps(info, indent=2))


def build_trainer(recipe: Recipe, callbacks=None):
    """The trainer of a recipe, with its models, tokenizers and data (heavy: loads everything)."""
    config, options = recipe.config, recipe.options
    apply_env(options)
    data = training_data(recipe)  # refused here, before any model, where the method needs labels the rows lack
    train, evaluation = data.train, data.evaluation
    if evaluation is not None and config.eval_strategy == "no":
        config.eval_strategy = "steps"
        config.eval_steps = config.eval_steps or config.logging_steps

    check_evaluation_splits(recipe)  # they exist and hold prompts: found now, not after training
    column = getattr(config, "teacher_column", None)
    if column is not None and column not in train.column_names:  # before any model is built
        raise ValueError(f"teacher_column={column!r} is not a column of the train data (it has "
                         f"{train.column_names}).")
    agreement_data = None
    if options["agreement"]:
        agreement_data = evaluation_split(recipe, options["agreement"]["split"], options["agreement"]["samples"],
                                          key="agreement.split")
    student, tokenizer = resolve_student(recipe)
    check_evaluation_splits(recipe, tokenizer)  # chat prompts need the tokenizer's template
    callbacks = list(callbacks or [])
    if agreement_data is not None:
        settings = options["agreement"]
        callbacks.append(AgreementCallback(
            agreement_data, every_steps=settings["every_steps"], num_samples=settings["samples"],
            max_new_tokens=settings["max_new_tokens"], batch_size=settings["batch_size"],
            answer_extractor=settings["answer_extractor"]))
    kwargs = dict(**trainer_data_kwargs(recipe, data), eval_dataset=evaluation, processing_class=tokenizer,
                  callbacks=callbacks)
    if options["peft"]:
        kwargs["peft_config"] = LoraConfig(**options["peft"])
    if options["teachers"]:  # several: the models a recipe names as objects or names, as for one teacher
        kwargs["teacher_models"] = [_recipe_teacher(entry, config) for entry in options["teachers"]]
    elif recipe.needs_teacher and config.teacher_model_name_or_path is not None:  # else a cache or a server
        teacher, teacher_tokenizer = resolve_teacher(recipe)
        kwargs.update(teacher_model=teacher, teacher_processing_class=teacher_tokenizer)
    elif recipe.needs_teacher and getattr(config, "teacher_tokenizer_name_or_path", None) is not None:
        # A cache or a server read at the teacher's own tokenization: the tokenizer the recipe names (a demo spec too).
        kwargs["teacher_processing_class"] = resolve_tokenizer(config.teacher_tokenizer_name_or_path)
    elif recipe.needs_teacher and getattr(config, "teacher_url", None) is not None:
        # The served model's name, as a recipe names models (a demo spec too), gives the tokenizer to check.
        kwargs["teacher_processing_class"] = resolve_tokenizer(served_model_name(config))
    return recipe.trainer_class(model=student, args=config, **kwargs)


def _recipe_teacher(entry: dict, config) -> dict:
    """A `teachers:` entry as the trainer takes it: a demo model built (with its tokenizer), a tokenizer it names
    loaded, a served teacher's tokenizer resolved as a recipe names models (its own `tokenizer`, else the served
    model's name)."""
    entry = dict(entry)
    if entry.get("model") is not None:
        model, tokenizer = resolve_model(entry["model"], entry.get("tokenizer"))
        if not isinstance(model, str):  # a demo model, built here: named by its spec in run_info and the card
            model.config._name_or_path = entry["model"]
            entry["tokenizer"] = tokenizer  # built with it: nothing to load by its name
        elif entry.get("tokenizer") is not None:
            entry["tokenizer"] = tokenizer
        entry["model"] = model
    elif entry.get("url") is not None:
        name = entry.get("tokenizer") or served_model_name(config, entry["url"])
        entry["tokenizer"] = resolve_tokenizer(name)
    return entry


def evaluate_recipe(recipe: Recipe) -> None:
    """The recipe's `evaluation` block on the models its finished run saved; results in `<output_dir>/eval/`, with
    `eval/done.json` last. Always from the saved folder, so that a run resumed or re-run is scored the same."""
    folder = os.path.join(recipe.config.output_dir, "eval")
    evaluate_trained(recipe.options["evaluation"], TrainedModels.from_output(recipe), recipe, folder,
                     cache_root=folder)
    write_done(folder, {"evaluation": recipe.options["evaluation"]["metrics"]})
    print(f"Evaluation written to {folder}", flush=True)


def write_recipe_teacher_cache(recipe: Recipe) -> None:
    """`kd-train cache-teacher`: the recipe's trainer is built, which writes its teacher cache when it is not complete
    (or checks it against the recipe's data when it is), and nothing is trained."""
    trainer = build_trainer(recipe)
    if trainer.is_world_process_zero():
        cache = trainer.teacher.cache
        print(f"Teacher cache ready: {cache.describe()}; {cache.bytes_per_token():.1f} bytes a label token.",
              flush=True)


def finished_message(output_dir: str) -> str:
    return (f"{output_dir} holds a finished run (done.json): left alone. To train again, use another output_dir or "
            "overwrite_output_dir=true.")


def run_recipe(recipe: Recipe, callbacks=None, progress: TrainerCallback | None = None):
    """Train (resuming from the output folder's last intact checkpoint, if any), save, and publish if asked; returns
    the trainer, or None when the output folder already holds the finished run (it is left alone).

    `progress`: a callback that reports the steps in place of the trainer's own printing (its per-log dictionaries or
    its tqdm bar); what is logged still reaches `trainer_state.json` and `report_to`."""
    config = recipe.config
    start_over_if_asked(recipe)  # an empty folder already when kd-train did it before its checks
    if is_finished(config.output_dir):
        print(finished_message(config.output_dir), flush=True)
        return None
    check_output_dir(recipe)
    publish = config.push_to_hub
    config.push_to_hub = False  # publishing happens once, at the end, from a complete local folder
    resume = config.resume_from_checkpoint or intact_checkpoint(config.output_dir)
    trainer = build_trainer(recipe, [*(callbacks or []), *([progress] if progress else [])])
    if progress is not None:
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    if trainer.is_world_process_zero():
        write_run_info(recipe, resume, trainer)
        if resume:
            print(f"Resuming from {resume}", flush=True)
    trainer.train(resume_from_checkpoint=resume)
    save_final(trainer)
    if publish and trainer.is_world_process_zero():
        folder = build_publish_folder(trainer, merge_lora=recipe.options["merge_lora"],
                                      dataset_name=recipe.options["dataset_name"])
        print(f"Publish folder complete: {folder}", flush=True)
        url = upload(folder, config.hub_model_id or os.path.basename(os.path.abspath(config.output_dir)),
                     token=config.hub_token)
        print(f"Published to {url}", flush=True)
    return trainer
