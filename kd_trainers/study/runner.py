"""Running a study: the prepare steps, every cell × seed as an ordinary recipe run, its evaluation, then the report.

Resumable: a finished step or cell has a `done.json`, written last (atomically), and is skipped on a re-run. A cell
without it is run again: its training resumes from its last complete checkpoint (see `kd_trainers.checkpointing`) and
its evaluation is redone from scratch, so partial results are never mixed in.

A cell (or prepare step) whose recipe has an `accelerate` block is run as `python -m kd_trainers RECIPE overrides` in
its own processes, exactly as `kd-train` would run it, and is then evaluated here from its output folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd

from ..evaluation.trained import TrainedModels, evaluate_trained
from ..files import DONE, write_done
from ..recipe.run import run_recipe
from ..recipe.schema import load_recipe
from .spec import Cell, Study


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


def cell_dir(study: Study, cell: Cell, seed: int) -> str:
    safe = cell.name.replace("/", "_").replace(",", "__").replace("=", "-")
    return os.path.join(study.output_dir, "cells", safe, f"seed{seed}")


def launch_recipe(recipe_path: str, overrides: list[str]) -> None:
    """Runs a recipe with an `accelerate` block the way `kd-train` does, in its own processes; raises
    `StudyRunError` when it fails (its output is printed as it runs)."""
    command = [sys.executable, "-m", "kd_trainers", recipe_path, *overrides]
    code = subprocess.call(command)
    if code != 0:
        raise StudyRunError(f"{recipe_path} failed (exit code {code}). Command: {' '.join(command)}")


def train(recipe_path: str, overrides: list[str]) -> tuple[object, TrainedModels]:
    """`(recipe, trained models)`: trained here on one process, or launched when the recipe asks for `accelerate`."""
    recipe = load_recipe(recipe_path, overrides)
    if recipe.options["accelerate"]:
        launch_recipe(recipe_path, overrides)
        return recipe, TrainedModels.from_output(recipe)
    return recipe, TrainedModels.from_trainer(run_recipe(recipe))


def evaluate_cell(study: Study, trained: TrainedModels, recipe, directory: str) -> pd.DataFrame:
    return evaluate_trained(study.evaluation, trained, recipe, directory, cache_root=study.output_dir)


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
        train(recipe_path, _as_overrides({**step.get("overrides", {}), "output_dir": folder}, prepared))
        write_done(folder, {"recipe": recipe_path})

    for cell in study.cells:
        for seed in study.seeds:
            directory = cell_dir(study, cell, seed)
            if os.path.exists(os.path.join(directory, DONE)):
                log(f"[study] {cell.name} seed {seed}: done, skipped")
                continue
            os.makedirs(directory, exist_ok=True)
            log(f"[study] {cell.name} seed {seed}: training and evaluating")
            # The study evaluates every cell itself, so a recipe's own evaluation block is switched off.
            values = {**study.overrides, **cell.overrides, "seed": seed, "evaluation": None,
                      "output_dir": os.path.join(directory, "train")}
            recipe, trained = train(cell.recipe or study.base_recipe, _as_overrides(values, prepared))
            evaluate_cell(study, trained, recipe, directory)
            write_done(directory, {"cell": cell.name, "levels": cell.levels, "seed": seed, "overrides": values})
    return write_report(study)
