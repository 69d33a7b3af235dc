"""`kd-train`: run, validate or list recipes.

    kd-train RECIPE [key=value ...]          run a recipe (relaunched under `accelerate launch` if it has an
                                             `accelerate` block); also `python -m kd_trainers RECIPE ...` and
                                             `accelerate launch [flags] -m kd_trainers RECIPE ...`
    kd-train validate RECIPE [key=value ...] check a recipe without loading anything heavy
    kd-train list                            the shipped recipes, with the first line of their header
"""

from __future__ import annotations

import glob
import os
import sys

from .recipe.schema import RecipeError, load_recipe

RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")


def shipped_recipes() -> list[str]:
    """Every recipe under the repository's `recipes/` (recursively); accelerate configs and studies excluded."""
    paths = glob.glob(os.path.join(RECIPES_DIR, "**", "*.yaml"), recursive=True)
    return sorted(p for p in paths if not any(os.sep + folder + os.sep in p for folder in ("accelerate", "studies")))


def _header(path: str) -> str:
    with open(path) as handle:
        for line in handle:
            if line.startswith("#") and line.strip("# \n"):
                return line.strip("# \n")
    return ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command = argv[0]
    if command == "list":
        for path in shipped_recipes():
            print(f"{os.path.relpath(path, os.path.dirname(RECIPES_DIR))}  {_header(path)}")
        return 0
    validate_only = command == "validate"
    if validate_only:
        argv = argv[1:]
        if not argv:
            print("kd-train validate RECIPE [key=value ...]", file=sys.stderr)
            return 2
    recipe_path, overrides = argv[0], argv[1:]
    try:
        recipe = load_recipe(recipe_path, overrides, portable=validate_only)
    except RecipeError as error:
        print(f"Recipe error: {error}", file=sys.stderr)
        return 2
    if validate_only:
        print(f"{recipe_path}: valid ({recipe.method}, output_dir {recipe.config.output_dir}).")
        for note in recipe.hardware_notes:
            print(f"  note: not runnable on this machine as is: {note}")
        return 0

    from .recipe.launch import already_launched, relaunch
    from .recipe.run import apply_env

    apply_env(recipe.options)  # before a relaunch, so that every launched process inherits it

    if recipe.options["accelerate"] and not already_launched():
        code = relaunch(recipe_path, overrides, recipe.options["accelerate"])
        if code == 0 and recipe.options["evaluation"]:
            # Here, after every launched process has ended: evaluation needs one process and the saved model.
            from .evaluation.trained import TrainedModels
            from .recipe.run import evaluate_recipe

            evaluate_recipe(recipe, TrainedModels.from_output(recipe))
        return code
    from .distributed import end_process_group
    from .publish import PublishError
    from .recipe.run import run_recipe

    try:
        run_recipe(recipe)
    except PublishError as error:
        print(f"Publish error: {error}", file=sys.stderr)
        return 3
    finally:
        end_process_group()
    return 0


if __name__ == "__main__":
    from .distributed import exit_launched_worker

    status = main()
    exit_launched_worker(status)
    sys.exit(status)
