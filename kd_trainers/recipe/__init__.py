"""YAML recipes: `schema.py` (keys, validation), `preflight.py` (what the recipe needs from this machine, checked
before anything loads), `data.py` (datasets, column mapping, row checks), `output.py` (the output folder: finished,
changed settings, intact checkpoints, the atomic final save), `launch.py` (accelerate configs and relaunch), `run.py`
(building and running the trainer). A new method is one line in `schema.METHODS`."""

from .schema import METHODS, Recipe, RecipeError, load_recipe

__all__ = ["METHODS", "Recipe", "RecipeError", "load_recipe"]
