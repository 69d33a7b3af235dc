"""Reading recipe files, light: YAML 1.2 booleans, no key given twice, `key=value` overrides, and the errors a file can
have on its own (missing, a folder, not YAML, not a mapping, a study given as a recipe). `kd-train` reads a recipe
here first, so that these answer at once, before the config classes (and torch) are imported to validate it
(`schema.py`)."""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from .catalog import shipped
from .errors import RecipeError
from ..runtime.suggest import did_you_mean


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only `true` and `false`.

    YAML 1.1 also reads `yes`, `no`, `on` and `off` as booleans, so `save_strategy: no` (as every transformers user
    types it) would reach the config as `False`. Here they stay the text the user wrote; a boolean field turns them into
    booleans itself (`fields.RecipeFields`), and a string or enum field keeps them.
    """


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def _mapping_without_duplicates(loader: RecipeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are each given once: YAML would silently keep the last of two `kd_temperature:` lines."""
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                "keep one", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def load_yaml(text_or_stream):
    """A YAML document read with `RecipeLoader` (recipes, studies and `key=value` overrides alike)."""
    return yaml.load(text_or_stream, Loader=RecipeLoader)


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, YAML-parsed value)."""
    if "=" not in text:
        raise RecipeError(f"Override {text!r} is not key=value (for example max_steps=10).")
    key, value = text.split("=", 1)
    return key.strip(), load_yaml(value) if value.strip() else None


def _set_nested(values: dict, key: str, value) -> None:
    """`values[a][b] = value` for the key `a.b` (nested recipe blocks such as `peft` and `accelerate`)."""
    *parents, last = key.split(".")
    target = values
    for part in parents:
        if target.get(part) is None:
            target[part] = {}
        target = target[part]
        if not isinstance(target, dict):
            raise RecipeError(f"Override {key}={value!r}: {part!r} is not a mapping in the recipe.")
    target[last] = value


def read_yaml_mapping(path: str, error: type[ValueError], hint: str = "") -> dict:
    """The mapping in a YAML file, or `error` naming the file: missing, not YAML, or not a mapping."""
    if os.path.isdir(path):
        inside = sorted(name for name in os.listdir(path) if name.endswith((".yaml", ".yml")))
        shown = f" (it holds {', '.join(inside[:6])}{', ...' if len(inside) > 6 else ''})" if inside else ""
        raise error(f"{path!r} is a folder, not a YAML file; name a file in it{shown}.{hint}")
    if not os.path.isfile(path):
        raise error(f"File {path!r} does not exist.{hint}")
    with open(path) as handle:
        try:
            values = load_yaml(handle) or {}
        except yaml.YAMLError as problem:
            raise error(f"{path}: not valid YAML: {_one_line(problem)}") from None
    if not isinstance(values, dict):
        raise error(f"{path}: expected a mapping of keys to values, got {type(values).__name__}.")
    return values


def _one_line(problem: yaml.YAMLError) -> str:
    """A YAML error as one line: what is wrong and where (PyYAML's own text spans several lines)."""
    mark = getattr(problem, "problem_mark", None)
    what = " ".join(str(part) for part in (getattr(problem, "context", None), getattr(problem, "problem", None))
                    if part) or str(problem).splitlines()[0]
    return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark else what


def refuse_study(values: dict, path: str) -> None:
    """A study file given where a recipe is expected: said, with the command that runs it."""
    if values.get("method") is None and ("base_recipe" in values or "grid" in values):
        raise RecipeError(f"{path}: this is a study (it has base_recipe/grid): run it with kd-study {path}.")


def read_recipe_values(path: str, overrides: list[str] | None = None) -> dict:
    """A recipe file's values with the command line's `key=value` overrides merged in, not yet validated."""
    hint = did_you_mean(path[:-5] if path.endswith(".yaml") else path, shipped("recipe"))
    values = read_yaml_mapping(path, RecipeError, f"{hint or ''} `kd-train list` shows the shipped recipes.")
    for text in overrides or []:
        key, value = parse_override(text)
        _set_nested(values, key, value)
    refuse_study(values, path)
    return values
