"""Running a study: the prepare steps (each scored as a reference: the teacher), every cell × seed as an ordinary
recipe run, its evaluation, then the report.

Checked whole first (`check_study`): every cell's merged recipe, before the first cell trains.

Resumable: a finished step or cell has a `done.json`, written last (atomically), and is skipped on a re-run. A cell
without it is taken up where it stopped: a finished training run (its own `done.json`) is not trained again, an
interrupted one resumes from its last intact checkpoint, and the evaluation is redone from scratch on the saved
models, so a re-run gives the same scores and report as a study that was never interrupted.

A cell (or prepare step) whose recipe has an `accelerate` block is run as `python -m kd_trainers RECIPE overrides` in
its own processes, exactly as `kd-train` would run it, and is then evaluated here from its output folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd

from ..files import DONE, write_done
from ..recipe.evaluate import TrainedModels, evaluate_trained
from ..recipe.output import is_finished
from ..recipe.preflight import preflight
from ..recipe.run import run_recipe
from ..recipe.schema import RecipeError, load_recipe
from ..redaction import redact
from .report import write_report
from .spec import Cell, Study, StudyError, cell_dir, reference_dir


class StudyRunError(RuntimeError):
    """A cell or prepare step whose training failed in its own processes."""


def _as_overrides(values: dict, prepared: dict[str, str]) -> list[str]:
    """`{key: value}` -> `["key=<json>"]`, with `{prepare.NAME}` in strings replaced by that step's output folder."""
    result = []
    for key, value in values.items():
        if isinstance(value, str):
            for name, folder in prepared.items():
                value = value.replace("{prepare." + name + "}", folder)
        result.append(f"{key}={json.dumps(value)}")
    return result


def prepare_folders(study: Study) -> dict[str, str]:
    """`{prepare step name: its output folder}`."""
    return {step["name"]: os.path.abspath(os.path.join(study.output_dir, "prepare", step["name"]))
            for step in study.prepare}


def step_recipe(study: Study, step: dict) -> str:
    return step["recipe"] if os.path.isabs(step["recipe"]) else os.path.join(
        os.path.dirname(os.path.abspath(study.path)), step["recipe"])


def cell_values(study: Study, cell: Cell, seed: int) -> dict:
    """A cell's overrides of its recipe. The study evaluates every cell itself: the recipe's own evaluation is off."""
    return {**study.overrides, **cell.overrides, "seed": seed, "evaluation": None,
            "output_dir": os.path.join(cell_dir(study, cell, seed), "train")}


def check_study(study: Study) -> None:
    """Every prepare step's and every cell's merged recipe, checked as `kd-train` checks one, before the first cell
    starts: a typo in the last cell is found before the first one trains. Raises `StudyError` naming the cell."""
    prepared = prepare_folders(study)
    pending = tuple(folder for folder in prepared.values() if not os.path.exists(os.path.join(folder, DONE)))
    runs = [(f"prepare {step['name']}", step_recipe(study, step),
             {**step.get("overrides", {}), "output_dir": prepared[step["name"]]}) for step in study.prepare]
    runs += [(f"cell {cell.name} seed {seed}", cell.recipe or study.base_recipe, cell_values(study, cell, seed))
             for cell in study.cells for seed in study.seeds]
    for name, recipe_path, values in runs:
        try:
            recipe = load_recipe(recipe_path, _as_overrides(values, prepared))
            preflight(recipe, pending=pending)
        except RecipeError as error:
            raise StudyError(f"{study.path}: {name}: {error}") from None


def launch_recipe(recipe_path: str, overrides: list[str]) -> None:
    """Runs a recipe with an `accelerate` block the way `kd-train` does, in its own processes; raises
    `StudyRunError` when it fails (its output is printed as it runs)."""
    command = [sys.executable, "-m", "kd_trainers", recipe_path, *overrides]
    code = subprocess.call(command)
    if code != 0:
        raise StudyRunError(f"{recipe_path} failed (exit code {code}). Command: {' '.join(command)}")


def train(recipe_path: str, overrides: list[str]):
    """The recipe, trained here on one process or launched when it asks for `accelerate`; a run whose output folder
    is finished (`done.json`) is not trained again."""
    recipe = load_recipe(recipe_path, overrides)
    if is_finished(recipe.config.output_dir):
        return recipe
    if recipe.options["accelerate"]:
        launch_recipe(recipe_path, overrides)
    else:
        run_recipe(recipe)  # the trainer is dropped: the cell is evaluated from what the run saved
    return recipe


def evaluate_cell(study: Study, recipe, directory: str) -> pd.DataFrame:
    """The study's evaluation of a cell's trained models, loaded from the folder its run saved (a cell resumed after
    a kill is scored exactly as one that ran straight through)."""
    return evaluate_trained(study.evaluation, TrainedModels.from_output(recipe), recipe, directory,
                            cache_root=study.output_dir)


def evaluate_reference(study: Study, step: dict, prepared: dict[str, str], directory: str) -> pd.DataFrame:
    """A prepare step's trained model (a teacher), scored by the study's evaluation as the students are; metrics
    against a teacher (agreement, fidelity) are blank for it."""
    recipe = load_recipe(step_recipe(study, step),
                         _as_overrides({**step.get("overrides", {}), "output_dir": prepared[step["name"]]}, prepared))
    trained = TrainedModels.from_output(recipe)
    return evaluate_trained(study.evaluation, TrainedModels(trained.model, trained.tokenizer, None), recipe,
                            directory, cache_root=study.output_dir)


def run_study(study: Study, log=print) -> str:
    """Runs what is not finished yet, then writes the report; returns the report folder."""
    check_study(study)
    prepared = prepare_folders(study)
    for step in study.prepare:
        folder = prepared[step["name"]]
        if os.path.exists(os.path.join(folder, DONE)):
            log(f"[study] prepare {step['name']}: done, skipped")
            continue
        recipe_path = step_recipe(study, step)
        log(f"[study] prepare {step['name']}: {recipe_path}")
        train(recipe_path, _as_overrides({**step.get("overrides", {}), "output_dir": folder}, prepared))
        write_done(folder, {"recipe": recipe_path})
    for step in study.prepare:
        directory = reference_dir(study, step["name"])
        if os.path.exists(os.path.join(directory, DONE)):
            continue
        log(f"[study] reference {step['name']}: evaluating")
        os.makedirs(directory, exist_ok=True)
        evaluate_reference(study, step, prepared, directory)
        write_done(directory, {"reference": step["name"]})

    for cell in study.cells:
        for seed in study.seeds:
            directory = cell_dir(study, cell, seed)
            if os.path.exists(os.path.join(directory, DONE)):
                log(f"[study] {cell.name} seed {seed}: done, skipped")
                continue
            os.makedirs(directory, exist_ok=True)
            log(f"[study] {cell.name} seed {seed}: training and evaluating")
            values = cell_values(study, cell, seed)
            recipe = train(cell.recipe or study.base_recipe, _as_overrides(values, prepared))
            evaluate_cell(study, recipe, directory)
            write_done(directory, {"cell": cell.name, "levels": cell.levels, "seed": seed,
                                   "overrides": redact(values)})
    return write_report(study)
