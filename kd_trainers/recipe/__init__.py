"""YAML recipes: `schema.py` (keys, validation), `data.py` (datasets and column mapping), `launch.py` (accelerate
configs and relaunch), `run.py` (building and running the trainer). A new method is one line in `schema.METHODS`."""

from .schema import METHODS, Recipe, RecipeError, load_recipe

__all__ = ["METHODS", "Recipe", "RecipeError", "load_recipe"]
