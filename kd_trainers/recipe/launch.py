"""Launching a recipe under `accelerate launch`: the named accelerate configs and the relaunch command.

The named configs are the files `recipes/accelerate/NAME.yaml` (shipped in the package): a recipe's
`accelerate: {config: zero3}` and a user's `accelerate launch --config_file recipes/accelerate/zero3.yaml` read the
same file. DeepSpeed configs leave gradient accumulation, clipping and precision to the recipe (the Trainer fills
DeepSpeed's "auto" values from it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import yaml

from .catalog import shipped, shipped_path
from .errors import RecipeError


LAUNCHED_ENV = "KD_TRAINERS_LAUNCHED"  # set in the relaunched processes, so that they do not relaunch again

def named_accelerate_configs() -> dict[str, dict]:
    """`{name: config}` of the accelerate configs shipped as `recipes/accelerate/NAME.yaml` (their one source)."""
    configs = {}
    for name in shipped("accelerate"):
        with open(shipped_path(name)) as handle:
            configs[name.split("/", 1)[1]] = yaml.safe_load(handle)
    return configs


def existing_config_file(name_or_path: str, recipe_path: str = "<recipe>") -> str | None:
    """None for a named config; else the existing accelerate config file it names (as given, or relative to the
    recipe). Raises `RecipeError` when it is neither. Writes nothing: recipe validation calls it."""
    named = named_accelerate_configs()
    if name_or_path in named:
        return None
    candidate = name_or_path if os.path.isabs(name_or_path) else os.path.join(os.path.dirname(recipe_path),
                                                                              name_or_path)
    for path in (name_or_path, candidate):
        if os.path.isfile(path):
            return path
    raise RecipeError(f"{recipe_path}: accelerate.config: {name_or_path!r} is neither a named config "
                      f"({', '.join(named)}) nor an existing file.")


def accelerate_config_path(name_or_path: str, recipe_path: str = "<recipe>") -> str:
    """The file to give `accelerate launch --config_file`: a shipped config's file, or the existing file the recipe
    names."""
    existing = existing_config_file(name_or_path, recipe_path)
    return existing if existing is not None else shipped_path(f"accelerate/{name_or_path}")


def free_port() -> int:
    """A TCP port free on this machine right now (for the launcher's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launched_by_kd_train() -> bool:
    """True in processes that `relaunch` started (the launching process then does what must happen once, after)."""
    return bool(os.environ.get(LAUNCHED_ENV))


def already_launched() -> bool:
    """True inside `accelerate launch` / `torchrun` (ours or the user's), where the recipe must simply run."""
    return launched_by_kd_train() or "LOCAL_RANK" in os.environ


def relaunch(recipe_path: str, overrides: list[str], block: dict, command_name: str | None = None) -> int:
    """Runs this recipe again under `accelerate launch` with the recipe's accelerate block (as `kd-train
    command_name RECIPE` when given, e.g. `cache-teacher`); returns its exit code."""
    config_file = accelerate_config_path(block.get("config", "single_process"), recipe_path)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file]
    if "num_processes" in block:
        command += ["--num_processes", str(block["num_processes"])]
    if "MASTER_PORT" not in os.environ:  # a free port, so that runs started side by side do not collide
        command += ["--main_process_port", str(free_port())]
    command += ["-m", "kd_trainers", *([command_name] if command_name else []), recipe_path, *overrides]
    print("Launching: " + " ".join(command), flush=True)
    return subprocess.call(command, env={**os.environ, LAUNCHED_ENV: "1"})
