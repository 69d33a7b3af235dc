"""`kd-train`: run, validate, list and copy recipes.

    kd-train RECIPE [key=value ...]          run a recipe: a file, or a shipped recipe by name (`kd-train vanilla_kd`);
                                             relaunched under `accelerate launch` if it has an `accelerate` block;
                                             also `python -m kd_trainers RECIPE ...` and
                                             `accelerate launch [flags] -m kd_trainers RECIPE ...`
    kd-train cache-teacher RECIPE teacher_cache=PATH [key=value ...]
                                             run the recipe's teacher over its data once and write its sparse
                                             distributions to PATH; `kd-train RECIPE teacher_cache=PATH` then trains
                                             from them with no teacher in memory (and writes them first if missing)
    kd-train validate RECIPE [key=value ...] check a recipe without loading anything heavy
    kd-train list                            the shipped recipes and studies, with the first line of their header
    kd-train cp NAME DEST                    copy a shipped recipe (or study, or accelerate config) to edit it
    kd-train --version

Bad input (a recipe, a path, the data) stops before anything heavy loads, with one line and exit status 2; a run
whose loss stops being finite exits 1; `--debug` shows the traceback. A finished run (its output folder has
`done.json`) is left alone when run again; `overwrite_output_dir=true` starts it over.
"""

from __future__ import annotations

import os
import shutil
import sys

# Only light modules here: `--help`, `list`, `cp` and bad input answer without importing torch or the trainers.
from ..recipe.catalog import recipes_root, resolve, shipped, shipped_path
from ..recipe.errors import RecipeError
from ..recipe.yaml_files import read_recipe_values


def _header(path: str) -> str:
    with open(path) as handle:
        for line in handle:
            if line.startswith("#") and line.strip("# \n"):
                return line.strip("# \n")
    return ""


def _list() -> int:
    recipes, studies = shipped("recipe"), shipped("study")
    if not recipes:
        raise RecipeError(f"No shipped recipe in {recipes_root()}: this installation of kd-trainers is incomplete; "
                          "reinstall it.")
    width = max(len(name) for name in recipes + studies)
    print("Recipes (kd-train NAME, kd-train cp NAME my.yaml):")
    for name in recipes:
        print(f"  {name:<{width}}  {_header(shipped_path(name))}")
    print("Studies (kd-study NAME):")
    for name in studies:
        print(f"  {name:<{width}}  {_header(shipped_path(name))}")
    return 0


def _copy(argv: list[str]) -> int:
    if len(argv) != 2:
        raise RecipeError("kd-train cp NAME DEST: the name of a shipped recipe (kd-train list) and where to copy it.")
    name, destination = argv
    source = shipped_path(name)
    if source is None:
        from ..runtime.suggest import did_you_mean

        everything = shipped("recipe") + shipped("study") + shipped("accelerate")
        raise RecipeError(f"cp: {name!r} is not a shipped recipe.{did_you_mean(name, everything)} kd-train list "
                          "shows them.")
    if os.path.isdir(destination):
        destination = os.path.join(destination, os.path.basename(source))
    if os.path.exists(destination):
        raise RecipeError(f"cp: {destination!r} exists; remove it or choose another destination.")
    shutil.copyfile(source, destination)
    print(f"Copied {name} to {destination}; run it with kd-train {destination}")
    return 0


def one_line(error: BaseException) -> str:
    """An error's message on one line (library messages often span several), without the credentials of any URL."""
    from ..runtime.redaction import redact_urls

    return redact_urls(" ".join(str(error).split())) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Runs the command; the package's errors (bad input, a run stopped on a non-finite loss) print as one line and
    return 2 (or 1 for a stopped run), without a traceback unless `--debug` is given."""
    from ..runtime.errors import NonFiniteTrainingError, TeacherServerError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [argument for argument in argv if argument != "--debug"]
    try:
        return _main(argv)
    except BrokenPipeError:  # `kd-train list | head`: the reader has what it wanted
        try:  # no second error when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except RecipeError as error:
        if debug:
            raise
        print(f"Recipe error: {one_line(error)}", file=sys.stderr)
        return 2
    except (NonFiniteTrainingError, TeacherServerError) as error:
        if debug:
            raise
        print(f"kd-train: {one_line(error)}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as error:  # data, model loading, a study file: bad input found while loading it
        if debug:
            raise
        print(f"kd-train: {one_line(error)} (--debug shows the traceback)", file=sys.stderr)
        return 2


def _validate(recipe_path: str, overrides: list[str]) -> int:
    """`kd-train validate`: the recipe, what it names on this machine, its data and its output folder."""
    from ..recipe.evaluate import check_evaluation_splits
    from ..recipe.output import is_finished
    from ..recipe.preflight import preflight
    from ..recipe.schema import load_recipe

    from ..recipe.training_rows import describe_training_rows, training_data

    recipe = load_recipe(recipe_path, overrides, portable=True)
    not_yet: list[str] = []
    preflight(recipe, output=False, notes=not_yet)
    dataset, rows = recipe.options["dataset_name"], None
    if dataset == "demo" or os.path.exists(dataset):  # local data (not a Hub id): splits, columns and rows too
        try:
            rows = describe_training_rows(recipe, training_data(recipe))
            check_evaluation_splits(recipe)
        except ValueError as error:
            raise RecipeError(f"{recipe_path}: {error}") from None
    print(f"{recipe_path}: valid ({recipe.method}, output_dir {recipe.config.output_dir}).")
    if rows:
        print(f"  {rows}")
    for note in [*recipe.hardware_notes, *(one_line(message).removeprefix(f"{recipe_path}: ") for message in not_yet)]:
        print(f"  note: not runnable on this machine as is: {note}")
    try:
        from ..recipe.output import check_output_dir

        check_output_dir(recipe)
    except RecipeError as error:
        print(f"  note: {one_line(error)}")
    if is_finished(recipe.config.output_dir):
        print(f"  note: {recipe.config.output_dir} holds a finished run; running the recipe leaves it alone.")
    return 0


def _cache_teacher(recipe_path: str, overrides: list[str]) -> int:
    """`kd-train cache-teacher`: the recipe's teacher cache, written (on the recipe's processes) or checked."""
    from ..recipe.launch import already_launched, relaunch
    from ..recipe.preflight import preflight
    from ..recipe.run import apply_env, write_recipe_teacher_cache
    from ..recipe.schema import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    if getattr(recipe.config, "teacher_cache", None) is None:
        raise RecipeError(f"{recipe_path}: cache-teacher writes the cache named by teacher_cache, which is not set: "
                          f"kd-train cache-teacher {recipe_path} teacher_cache=PATH.")
    preflight(recipe, output=False, repair=True)  # the pass rewrites a damaged cache's blocks
    apply_env(recipe.options)
    if recipe.options["accelerate"] and not already_launched():
        return relaunch(recipe_path, overrides, recipe.options["accelerate"], command_name="cache-teacher")
    from ..runtime.distributed import end_process_group

    try:
        write_recipe_teacher_cache(recipe)
    finally:
        end_process_group()
    return 0


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command = argv[0]
    if command == "--version":
        from .. import __version__

        print(f"kd-trainers {__version__}")
        return 0
    if command == "list":
        return _list()
    if command == "cp":
        return _copy(argv[1:])
    usage = {"cache-teacher": "kd-train cache-teacher RECIPE teacher_cache=PATH [key=value ...]",
             "validate": "kd-train validate RECIPE [key=value ...]"}
    if command in usage:
        if len(argv) < 2:
            print(usage[command], file=sys.stderr)
            return 2
        recipe_path, overrides = resolve(argv[1]), argv[2:]
    else:
        recipe_path, overrides = resolve(argv[0]), argv[1:]
    # The file's own problems (missing, a folder, not YAML, a study) at once, before the heavy imports below.
    read_recipe_values(recipe_path, overrides)
    from ..runtime.progress import quiet_libraries

    quiet_libraries(transformers_warnings=True)  # the plan, progress, results and real warnings: not the libraries' bars and notices
    if command == "cache-teacher":
        return _cache_teacher(recipe_path, overrides)
    if command == "validate":
        return _validate(recipe_path, overrides)
    from ..recipe.schema import load_recipe

    recipe = load_recipe(recipe_path, overrides)

    from ..recipe.launch import already_launched, launched_by_kd_train, relaunch
    from ..recipe.output import check_output_dir, evaluation_finished, is_finished, start_over_if_asked
    from ..recipe.preflight import preflight
    from ..recipe.run import apply_env, evaluate_recipe, finished_message

    start_over_if_asked(recipe)  # before the checks: the old run's settings no longer matter
    evaluate_here = bool(recipe.options["evaluation"]) and not launched_by_kd_train() and \
        int(os.environ.get("WORLD_SIZE", "1")) == 1
    finished = is_finished(recipe.config.output_dir)
    if finished and not (evaluate_here and not evaluation_finished(recipe.config.output_dir)):
        check_output_dir(recipe)  # the same run (other settings are refused), needing nothing else: no server asked
        print(finished_message(recipe.config.output_dir), flush=True)
        return 0
    preflight(recipe)
    if finished:
        evaluate_recipe(recipe)  # training finished, its evaluation was interrupted
        return 0
    apply_env(recipe.options)  # before a relaunch, so that every launched process inherits it

    if recipe.options["accelerate"] and not already_launched():
        code = relaunch(recipe_path, overrides, recipe.options["accelerate"])
        if code == 0 and recipe.options["evaluation"]:
            # Here, after every launched process has ended: evaluation needs one process and the saved model.
            evaluate_recipe(recipe)
        return code
    from ..runtime.distributed import end_process_group
    from ..recipe.publish import PublishError
    from ..recipe.run import run_recipe

    try:
        run_recipe(recipe)
    except PublishError as error:
        print(f"Publish error: {one_line(error)}", file=sys.stderr)
        return 3
    finally:
        end_process_group()
    if evaluate_here:
        evaluate_recipe(recipe)
    elif recipe.options["evaluation"] and not launched_by_kd_train():
        print(f"Not evaluated here ({os.environ.get('WORLD_SIZE')} processes): run kd-eval --model "
              f"{recipe.config.output_dir} ...", flush=True)
    return 0


def run_as_main() -> None:
    """`python -m kd_trainers ...` (also under `accelerate launch`): a launched worker ends in
    `exit_launched_worker` (see `kd_trainers.runtime.distributed`); one process exits with the run's status."""
    from ..runtime.distributed import exit_launched_worker

    status = main()
    exit_launched_worker(status)
    sys.exit(status)


if __name__ == "__main__":
    run_as_main()
