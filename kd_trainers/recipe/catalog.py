"""The recipes shipped with the package: the repository's top-level `recipes/` is their one source; the build copies it
into the package as `kd_trainers/recipes/` (see `setup.py`), so that an installed package has them too.

A shipped recipe is named by its path under `recipes/` without `.yaml`: `vanilla_kd`, `telecom_qa/dskd_llama7b_tinyllama`,
`studies/methods`, `accelerate/zero3`. `kd-train NAME`, `kd-study NAME`, `kd-train list` and `kd-train cp NAME DEST`
use them.
"""

from __future__ import annotations

import os

from .errors import RecipeError

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGED = os.path.join(_PACKAGE, "recipes")  # an installed wheel
REPOSITORY = os.path.join(os.path.dirname(_PACKAGE), "recipes")  # a source checkout (editable install)
NOT_RECIPES = ("accelerate", "studies")  # folders of `recipes/` that hold other kinds of file


def recipes_root() -> str:
    """The folder of the shipped recipes; a `RecipeError` when the installation has none."""
    for folder in (PACKAGED, REPOSITORY):
        if os.path.isdir(folder):
            return folder
    raise RecipeError(f"No shipped recipes: neither {PACKAGED} nor {REPOSITORY} exists, so this installation of "
                      "kd-trainers is incomplete; reinstall it (pip install --force-reinstall kd-trainers).")


def shipped(kind: str = "recipe") -> list[str]:
    """The names of the shipped recipes (`kind="recipe"`), studies (`"study"`) or accelerate configs
    (`"accelerate"`), sorted."""
    root = recipes_root()
    names = []
    for folder, _, files in os.walk(root):
        for file in files:
            if not file.endswith(".yaml"):
                continue
            name = os.path.relpath(os.path.join(folder, file), root)[: -len(".yaml")].replace(os.sep, "/")
            first = name.split("/", 1)[0] if "/" in name else ""
            if (kind == "recipe" and first not in NOT_RECIPES) or (kind == "study" and first == "studies") or (
                    kind == "accelerate" and first == "accelerate"):
                names.append(name)
    return sorted(names)


def shipped_path(name: str) -> str | None:
    """The file of a shipped recipe, study or accelerate config named `name` (with or without `.yaml`), or None."""
    name = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if os.path.isabs(name) or name.startswith("."):
        return None
    path = os.path.join(recipes_root(), *name.split("/")) + ".yaml"
    return path if os.path.isfile(path) else None


def resolve(path_or_name: str) -> str:
    """An existing file as it is; else the shipped recipe of that name; else the text unchanged (the loader then says
    that it does not exist)."""
    if os.path.isfile(path_or_name):
        return path_or_name
    return shipped_path(path_or_name) or path_or_name
