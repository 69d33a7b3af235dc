"""Launching a recipe under `accelerate launch`: the named accelerate configs and the relaunch command.

The named configs are defined here once; `recipes/accelerate/*.yaml` are the same configs written out for users who
call `accelerate launch --config_file ...` themselves (a test keeps the two equal). DeepSpeed configs leave gradient
accumulation, clipping and precision to the recipe (the Trainer fills DeepSpeed's "auto" values from it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

import yaml

LAUNCHED_ENV = "KD_TRAINERS_LAUNCHED"  # set in the relaunched processes, so that they do not relaunch again

_BASE = {"compute_environment": "LOCAL_MACHINE", "machine_rank": 0, "num_machines": 1, "main_training_function":
         "main", "mixed_precision": "no", "rdzv_backend": "static", "same_network": True, "downcast_bf16": "no"}


def _deepspeed(stage: int, offload: bool = False) -> dict:
    config = {"zero_stage": stage, "offload_optimizer_device": "cpu" if offload else "none",
              "offload_param_device": "cpu" if offload and stage == 3 else "none"}
    if stage == 3:
        config.update(zero3_init_flag=False, zero3_save_16bit_model=True)
    return {**_BASE, "distributed_type": "DEEPSPEED", "num_processes": 2, "deepspeed_config": config}


ACCELERATE_CONFIGS: dict[str, dict] = {
    "single_process": {**_BASE, "distributed_type": "NO", "num_processes": 1},
    "multi_process": {**_BASE, "distributed_type": "MULTI_GPU", "num_processes": 2},
    "multi_process_cpu": {**_BASE, "distributed_type": "MULTI_CPU", "num_processes": 2, "use_cpu": True},
    "zero2": _deepspeed(2),
    "zero3": _deepspeed(3),
    "zero3_offload": _deepspeed(3, offload=True),
}


def existing_config_file(name_or_path: str, recipe_path: str = "<recipe>") -> str | None:
    """None for a named config; else the existing accelerate config file it names (as given, or relative to the
    recipe). Raises `RecipeError` when it is neither. Writes nothing: recipe validation calls it."""
    from .schema import RecipeError

    if name_or_path in ACCELERATE_CONFIGS:
        return None
    candidate = name_or_path if os.path.isabs(name_or_path) else os.path.join(os.path.dirname(recipe_path),
                                                                              name_or_path)
    for path in (name_or_path, candidate):
        if os.path.isfile(path):
            return path
    raise RecipeError(f"{recipe_path}: accelerate.config: {name_or_path!r} is neither a named config "
                      f"({', '.join(ACCELERATE_CONFIGS)}) nor an existing file.")


def accelerate_config_path(name_or_path: str, recipe_path: str = "<recipe>") -> str:
    """The file to give `accelerate launch --config_file`: a named config written to a temporary file, or the
    existing file the recipe names."""
    existing = existing_config_file(name_or_path, recipe_path)
    if existing is not None:
        return existing
    handle = tempfile.NamedTemporaryFile("w", suffix=f"-{name_or_path}.yaml", delete=False)
    with handle:
        yaml.safe_dump(ACCELERATE_CONFIGS[name_or_path], handle)
    return handle.name


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


def relaunch(recipe_path: str, overrides: list[str], block: dict) -> int:
    """Runs this recipe again under `accelerate launch` with the recipe's accelerate block; returns its exit code."""
    config_file = accelerate_config_path(block.get("config", "single_process"), recipe_path)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file]
    if "num_processes" in block:
        command += ["--num_processes", str(block["num_processes"])]
    if "MASTER_PORT" not in os.environ:  # a free port, so that runs started side by side do not collide
        command += ["--main_process_port", str(free_port())]
    command += ["-m", "kd_trainers", recipe_path, *overrides]
    print("Launching: " + " ".join(command), flush=True)
    return subprocess.call(command, env={**os.environ, LAUNCHED_ENV: "1"})
