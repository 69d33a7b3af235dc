"""YAML recipes: `yaml_files.py` (reading a file and its overrides, light), `schema.py` (keys, validation),
`preflight.py` (what the recipe needs from this machine, checked before anything loads), `data.py` (datasets, column
mapping, row checks), `output.py` (the output folder: finished, changed settings, intact checkpoints, the atomic final
save), `launch.py` (accelerate configs and relaunch), `run.py` (building and running the trainer), `catalog.py` (the
recipes shipped in the package), `models.py` (the models a recipe names), `evaluate.py` (a finished run's
evaluation). Methods register themselves (`kd_trainers.methods`)."""

from ..runtime.lazy import lazy_getattr
from .errors import RecipeError

_EXPORTS = {"Recipe": ".schema", "load_recipe": ".schema"}  # loaded on first use: heavy
__all__ = ["Recipe", "RecipeError", "load_recipe"]
__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
