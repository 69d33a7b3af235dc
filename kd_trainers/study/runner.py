"""Running a study: the prepare steps (each scored as a reference: the teacher), every cell × seed as an ordinary
recipe run, its evaluation, then the report.

Checked whole first (`check_study`): every cell's merged recipe, before the first cell trains.

A prepare step with `cache: true` trains into the user cache (`$KD_TRAINERS_CACHE/prepare/<key>`), keyed by the
settings its model is made with (`run_settings`: the merged recipe, without logging or output keys) and the package
version, so another study, or the same one in another folder, that trains the same teacher finds it trained.

Resumable: a finished step or cell has a `done.json`, written last (atomically), and is skipped on a re-run. A cell
without it is taken up where it stopped: a finished training run (its own `done.json`) is not trained again, an
interrupted one resumes from its last intact checkpoint, and the evaluation is redone from scratch on the saved
models, so a re-run gives the same scores and report as a study that was never interrupted.

A cell (or prepare step) whose recipe has an `accelerate` block is run as `python -m kd_trainers RECIPE overrides` in
its own processes, exactly as `kd-train` would run it, and is then evaluated here from its output folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch

from .. import __version__
from ..runtime.files import is_done, user_cache_dir, write_atomically, write_done
from ..runtime.progress import TrainingProgress, format_seconds, libraries_quieted, quiet_libraries, reporting_to
from ..evaluation.harness import check_harness
from ..models.generation import load_predictions
from ..recipe.evaluate import (TrainedModels, evaluate_trained, load_recipe_teacher, store_teacher_predictions,
                               teacher_identity)
from ..recipe.output import is_finished, run_settings
from ..recipe.preflight import preflight
from ..recipe.run import run_recipe
from ..recipe.schema import RecipeError, load_recipe
from ..runtime.redaction import redact
from .report import write_report
from .spec import Cell, Study, StudyError, cell_dir, reference_dir, references_file


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


def step_recipe(study: Study, step: dict) -> str:
    return step["recipe"] if os.path.isabs(step["recipe"]) else os.path.join(
        os.path.dirname(os.path.abspath(study.path)), step["recipe"])


def cached_step_folder(recipe) -> str:
    """The user-cache folder of a prepare step's run, named by a hash of the settings its model is made with."""
    key = json.dumps({"settings": run_settings(recipe), "kd_trainers": __version__}, sort_keys=True)
    return os.path.join(user_cache_dir("prepare"), hashlib.sha256(key.encode()).hexdigest()[:16])


def prepare_folders(study: Study) -> dict[str, str]:
    """`{prepare step name: its output folder}`: under the study's folder, or in the user cache for a step with
    `cache: true` (resolved in order: a step may use an earlier one's folder)."""
    folders = {}
    for step in study.prepare:
        folder = os.path.abspath(os.path.join(study.output_dir, "prepare", step["name"]))
        if step.get("cache"):
            recipe = load_recipe(step_recipe(study, step),
                                 _as_overrides({**step.get("overrides", {}), "output_dir": folder}, folders))
            folder = cached_step_folder(recipe)
        folders[step["name"]] = folder
    return folders


def cell_values(study: Study, cell: Cell, seed: int) -> dict:
    """A cell's overrides of its recipe, with `{study_dir}` in strings replaced by the study's output folder (a teacher
    cache the cells share, for example). The study evaluates every cell itself: the recipe's own evaluation is off."""
    study_dir = os.path.abspath(study.output_dir)
    values = {key: value.replace("{study_dir}", study_dir) if isinstance(value, str) else value
              for key, value in {**study.overrides, **cell.overrides}.items()}
    return {**values, "seed": seed, "evaluation": None,
            "output_dir": os.path.join(cell_dir(study, cell, seed), "train")}


def check_study(study: Study) -> list[tuple[str, object]]:
    """Every prepare step's and every cell's merged recipe, checked as `kd-train` checks one, before the first cell
    starts: a typo in the last cell is found before the first one trains. Raises `StudyError` naming the cell.
    Returns `[(run name, loaded recipe)]`, prepare steps first."""
    try:
        prepared = prepare_folders(study)
    except RecipeError as error:
        raise StudyError(f"{study.path}: prepare: {error}") from None
    pending = tuple(folder for folder in prepared.values() if not is_done(folder))
    runs = [(f"prepare {step['name']}", step_recipe(study, step),
             {**step.get("overrides", {}), "output_dir": prepared[step["name"]]}) for step in study.prepare]
    runs += [(f"cell {cell.name} seed {seed}", cell.recipe or study.base_recipe, cell_values(study, cell, seed))
             for cell in study.cells for seed in study.seeds]
    checked = []
    for name, recipe_path, values in runs:
        try:
            recipe = load_recipe(recipe_path, _as_overrides(values, prepared))
            preflight(recipe, pending=pending)
        except RecipeError as error:
            raise StudyError(f"{study.path}: {name}: {error}") from None
        checked.append((name, recipe))
    if study.evaluation.get("lm_eval"):  # the task names, by lm-eval itself, before the first cell trains
        check_harness(study.evaluation["lm_eval"], study.path, StudyError)
    return checked


def teacher_references(study: Study, checked: list[tuple[str, object]],
                       prepared: dict[str, str]) -> list[tuple[str, str, dict]]:
    """`[(name, recipe path, cell overrides)]`: every distinct teacher of the cells that is not a prepare step's model
    (a Hub model, a demo one), scored once for the whole study as a reference row, as the prepare steps are; named
    `teacher_<model>`. `checked`: what `check_study` returns."""
    covered = {os.path.abspath(folder) for folder in prepared.values()}
    found: dict[str, tuple[Cell, int]] = {}
    runs = [(cell, seed) for cell in study.cells for seed in study.seeds]
    for (cell, seed), (_, recipe) in zip(runs, checked[len(study.prepare):]):
        if not recipe.needs_teacher:
            continue
        identity = teacher_identity(recipe)
        if any(path and os.path.abspath(str(path)) in covered for path in (identity["teacher"], identity["adapter"])):
            continue  # a prepare step's model: already a reference
        found.setdefault(json.dumps(identity, sort_keys=True, default=str), (cell, seed))
    references, taken = [], {step["name"] for step in study.prepare}
    for key, (cell, seed) in found.items():
        model = str(json.loads(key)["teacher"]).rstrip("/")
        model = os.path.basename(model) if os.path.isdir(model) else model  # a folder by its name, a Hub id whole
        name = base = "teacher_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", model)
        number = 1
        while name in taken:
            number += 1
            name = f"{base}_{number}"
        taken.add(name)
        references.append((name, cell.recipe or study.base_recipe, cell_values(study, cell, seed)))
    return references


def study_references(study: Study, teachers: list[tuple[str, str, dict]]) -> list[str]:
    """The study's reference rows: its prepare steps, then the cells' other teachers (`teacher_references`)."""
    return [step["name"] for step in study.prepare] + [name for name, _, _ in teachers]


def write_reference_names(study: Study, teachers: list[tuple[str, str, dict]]) -> None:
    os.makedirs(study.output_dir, exist_ok=True)
    write_atomically(references_file(study), json.dumps(study_references(study, teachers)))


def _steps(recipe) -> str:
    config = recipe.config
    return f"{config.max_steps} steps" if config.max_steps > 0 else f"{config.num_train_epochs:g} epochs"


def study_plan(study: Study, checked: list[tuple[str, object]], prepared: dict[str, str],
               teachers: list[tuple[str, str, dict]] = ()) -> list[str]:
    """The stages a run of the study will go through, as lines to print before it starts (`checked`: what
    `check_study` returns, prepare steps first, then every cell's seeds in order; `teachers`: what
    `teacher_references` returns)."""
    evaluation = study.evaluation
    rows = f"the first {evaluation['limit']}" if evaluation.get("limit") else "all"
    scored = f"{rows} rows of {evaluation['split']!r}, metrics {', '.join(evaluation['metrics'])}"
    lines = [f"Plan of study {study.name!r} (output: {os.path.abspath(study.output_dir)}):"]
    for step, (_, recipe) in zip(study.prepare, checked):
        folder = prepared[step["name"]]
        done = is_done(folder)
        if step.get("cache"):
            state = " (cached: found, skipped)" if done else f" (cached in {folder})"
        else:
            state = " (done, skipped)" if done else ""
        lines.append(f"  prepare {step['name']}: train {recipe.method} for {_steps(recipe)}{state}")
    references = study_references(study, teachers)
    if references:
        lines.append(f"  references {', '.join(references)}: evaluate on {scored}"
                     + (f"; lm-eval tasks {', '.join(evaluation['lm_eval']['tasks'])}" if evaluation.get("lm_eval")
                        else ""))
    first_seeds = checked[len(study.prepare)::len(study.seeds)]  # each cell's recipe at its first seed
    for cell, (_, recipe) in zip(study.cells, first_seeds):
        done = sum(is_done(cell_dir(study, cell, seed)) for seed in study.seeds)
        state = f" ({done} done, skipped)" if done else ""
        lines.append(f"  {cell.name}: {len(study.seeds)} seed(s), train {recipe.method} for {_steps(recipe)} each, "
                     f"then evaluate{state}")
    lines.append(f"  report: {len(study.hypotheses)} paired comparison(s) over {len(study.seeds)} seed(s)")
    return lines


def launch_recipe(recipe_path: str, overrides: list[str]) -> None:
    """Runs a recipe with an `accelerate` block the way `kd-train` does, in its own processes; raises
    `StudyRunError` when it fails (its output is printed as it runs)."""
    command = [sys.executable, "-m", "kd_trainers", recipe_path, *overrides]
    code = subprocess.call(command)
    if code != 0:
        raise StudyRunError(f"{recipe_path} failed (exit code {code}). Command: {' '.join(command)}")


def train(recipe_path: str, overrides: list[str]):
    """The recipe, trained here on one process (its steps as a progress line) or launched when it asks for
    `accelerate`; a run whose output folder is finished (`done.json`) is not trained again."""
    recipe = load_recipe(recipe_path, overrides)
    if is_finished(recipe.config.output_dir):
        return recipe
    if recipe.options["accelerate"]:
        launch_recipe(recipe_path, overrides)
    else:
        run_recipe(recipe, progress=TrainingProgress())  # dropped: the cell is evaluated from what the run saved
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


def _teacher_reference(study: Study, name: str, recipe_path: str, values: dict, prepared: dict[str, str]) -> None:
    """A cell's teacher, scored once for the study by its evaluation (lm-eval tasks included), as a reference."""
    directory = reference_dir(study, name)
    os.makedirs(directory, exist_ok=True)
    recipe = load_recipe(recipe_path, _as_overrides(values, prepared))
    teacher, tokenizer = load_recipe_teacher(recipe)
    evaluate_trained(study.evaluation, TrainedModels(teacher, tokenizer, None), recipe, directory,
                     cache_root=study.output_dir)
    answers = os.path.join(directory, "predictions.jsonl")
    if os.path.exists(answers):  # its answers are the ones the cells compare with (agreement, fidelity): kept once
        rows = load_predictions(answers)
        store_teacher_predictions(study.evaluation, study.output_dir, recipe, [row["prompt"] for row in rows],
                                  [row["prediction"] for row in rows])
    write_done(directory, {"reference": name, "teacher": teacher_identity(recipe)})


def _prepare_step(study: Study, step: dict, prepared: dict[str, str]) -> None:
    recipe_path = step_recipe(study, step)
    train(recipe_path, _as_overrides({**step.get("overrides", {}), "output_dir": prepared[step["name"]]}, prepared))
    write_done(prepared[step["name"]], {"recipe": recipe_path})


def _cached_reference(study: Study, step: dict, prepared: dict[str, str]) -> str | None:
    """Where a cached prepare step keeps its evaluation by a study's settings (`<its folder>/references/<key>`): the
    model and the evaluation are fixed, so the scores are too, and another study (or quickstart) reuses them."""
    if not step.get("cache"):
        return None
    key = json.dumps({"evaluation": study.evaluation, "kd_trainers": __version__}, sort_keys=True, default=str)
    return os.path.join(prepared[step["name"]], "references", hashlib.sha256(key.encode()).hexdigest()[:16])


def _reference(study: Study, step: dict, prepared: dict[str, str]) -> None:
    directory = reference_dir(study, step["name"])
    cached = _cached_reference(study, step, prepared)
    if cached is not None and is_done(cached):
        shutil.copytree(cached, directory, dirs_exist_ok=True)
        return
    os.makedirs(directory, exist_ok=True)
    evaluate_reference(study, step, prepared, directory)
    write_done(directory, {"reference": step["name"]})
    if cached is not None:  # whole or not at all: copied beside it, then moved into place
        staging = f"{cached}.{os.getpid()}.tmp"
        shutil.copytree(directory, staging, dirs_exist_ok=True)
        with contextlib.suppress(OSError):  # another process put the same scores there first
            os.replace(staging, cached)
        shutil.rmtree(staging, ignore_errors=True)


def _cell(study: Study, cell: Cell, seed: int, prepared: dict[str, str]) -> None:
    directory = cell_dir(study, cell, seed)
    os.makedirs(directory, exist_ok=True)
    values = cell_values(study, cell, seed)
    recipe = train(cell.recipe or study.base_recipe, _as_overrides(values, prepared))
    evaluate_cell(study, recipe, directory)
    write_done(directory, {"cell": cell.name, "levels": cell.levels, "seed": seed, "overrides": redact(values)})


@dataclass
class _Stage:
    """One unit of a study's work: `run(*args)` in this process or a worker's; `done` when its folder says so."""
    label: str
    doing: str
    run: Callable
    args: tuple
    done: bool


def _stages(study: Study, prepared: dict[str, str], teachers: list[tuple[str, str, dict]] = ()
            ) -> list[list[_Stage]]:
    """The study's stages in groups that may run side by side: the prepare steps (one after another when a step uses
    an earlier one's folder), the references (prepare steps' models, then the cells' other teachers), the cells."""
    steps = [_Stage(f"prepare {step['name']}", "training", _prepare_step, (study, step, prepared),
                    is_done(prepared[step["name"]])) for step in study.prepare]
    chained = any("{prepare." in json.dumps(step.get("overrides", {})) for step in study.prepare)
    groups = [[stage] for stage in steps] if chained else [steps]
    groups.append([_Stage(f"reference {step['name']}", "evaluating", _reference, (study, step, prepared),
                          is_done(reference_dir(study, step["name"]))) for step in study.prepare]
                  + [_Stage(f"reference {name}", "evaluating", _teacher_reference,
                            (study, name, recipe_path, values, prepared), is_done(reference_dir(study, name)))
                     for name, recipe_path, values in teachers])
    groups.append([_Stage(f"{cell.name} seed {seed}", "training, then evaluating", _cell, (study, cell, seed, prepared),
                          is_done(cell_dir(study, cell, seed))) for cell in study.cells for seed in study.seeds])
    return [group for group in groups if group]


def _start_worker(threads: int, quiet: bool) -> None:
    torch.set_num_threads(threads)
    if quiet:
        quiet_libraries()


def _heading(stage: _Stage, number: int, total: int, start: float) -> str:
    state = "done, skipped" if stage.done else stage.doing
    return f"[{format_seconds(time.monotonic() - start)}] ({number}/{total}) {stage.label}: {state}"


def _run_in_worker(stage: _Stage, number: int, total: int, start: float) -> None:
    """A stage in a worker process: its lines carry the stage's name, as several stages print at once (the heading
    when it starts: the monotonic clock is the machine's, shared by the processes)."""
    print(_heading(stage, number, total, start), flush=True)
    with reporting_to(lambda message: print(f"{message}  [{stage.label}]", flush=True)):
        stage.run(*stage.args)


def run_study(study: Study, log=print, workers: int = 1) -> str:
    """Runs what is not finished yet, then writes the report; returns the report folder. `log` gets the plan first,
    then a line per stage and progress lines (with an ETA) for training and generation.

    `workers`: stages run side by side in that many processes (spawned; the CPU threads split between them), the
    prepare steps together, then the references, then the cells; a group with one stage left runs here, on every
    thread. Tiny models (the demo) train faster side by side than with every thread on one. A worker prints its own
    lines (to standard output, each ending with its stage's name)."""
    start = time.monotonic()
    checked = check_study(study)
    # The prepare steps' folders, as checked (a cached step's folder is named by its settings: found once).
    prepared = {step["name"]: recipe.config.output_dir for step, (_, recipe) in zip(study.prepare, checked)}
    teachers = teacher_references(study, checked, prepared)
    write_reference_names(study, teachers)
    for line in study_plan(study, checked, prepared, teachers):
        log(line)
    groups = _stages(study, prepared, teachers)
    total = sum(len(group) for group in groups)
    numbered = iter(range(1, total + 1))

    def run_here(stage: _Stage) -> None:
        log(_heading(stage, next(numbered), total, start))
        if not stage.done:
            with reporting_to(log):
                stage.run(*stage.args)

    parallel = workers > 1
    # Spawned, not forked: a fork would copy torch's thread pools and locks.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(max(1, (os.cpu_count() or 1) // workers), libraries_quieted())
                               ) if parallel else contextlib.nullcontext()
    with pool:
        for group in groups:
            if not parallel or sum(not stage.done for stage in group) <= 1:
                for stage in group:  # nothing to run side by side: here, on every thread
                    run_here(stage)
                continue
            pending = []
            for stage in group:
                if stage.done:
                    log(_heading(stage, next(numbered), total, start))
                else:
                    pending.append(pool.submit(_run_in_worker, stage, next(numbered), total, start))
            for future in pending:
                future.result()  # a failed stage raises here, after the others of its group end
    log(f"[{format_seconds(time.monotonic() - start)}] report")
    return write_report(study)
