"""A recipe's output folder: what state it is in, and what a run may do with it.

- A finished run has `done.json`, written after its final save (itself complete or absent: written to
  `.staging/final/` and moved in). Running it again leaves it alone.
- `run_info.json` records the settings the model is made with; a run in the same folder with other settings is
  refused, naming them, unless `overwrite_output_dir: true` (which starts over), once the folder holds a checkpoint
  or a finished model (a run stopped before its first step binds nothing).
- Resume takes the newest checkpoint whose files are intact; a damaged one is named and set aside.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
import zipfile

from safetensors import safe_open
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..runtime.checkpointing import STAGING_DIR
from ..runtime.files import is_done, write_done
from ..runtime.redaction import redact
from .errors import RecipeError
from .launch import launched_by_kd_train


RUN_INFO = "run_info.json"
# Settings that do not change the trained model: a finished or interrupted run may be run again with other values.
NOT_MODEL_SETTINGS = re.compile(
    r"^(output_dir|overwrite_output_dir|resume_from_checkpoint|evaluation|agreement|env|report_to|run_name|project|"
    r"trackio_.*|logging_.*|log_.*|disable_tqdm|push_to_hub|hub_.*|save_.*|eval_.*|per_device_eval_batch_size|"
    r"eval_strategy|dataloader_num_workers|dataloader_prefetch_factor|dataloader_persistent_workers|dataloader_pin_memory|"
    r"merge_lora|"
    r"include_.*|ddp_backend|ddp_timeout|use_cpu|skip_memory_metrics)$")


KEYS_ADDED_LATER = ("prompts",)


def run_settings(recipe) -> dict:
    """The settings a run's model is made with: the recipe keys and config fields (defaults included), as JSON
    values, without those that only change logging, saving, evaluation or publishing."""
    # A recipe key added in a later version is left out where unset, so that the runs made without it (a cached
    # teacher) keep their settings, and their keys.
    values = {name: value for name, value in recipe.options.items()
              if not (name in KEYS_ADDED_LATER and value is None)}
    with warnings.catch_warnings():  # deprecated aliases (gradient_checkpointing) warn when read
        warnings.simplefilter("ignore", FutureWarning)
        values.update({f.name: getattr(recipe.config, f.name) for f in dataclasses.fields(recipe.config) if f.init})
    values["method"] = recipe.method
    kept = {key: value for key, value in values.items() if not NOT_MODEL_SETTINGS.match(key)}
    return json.loads(json.dumps(kept, default=str, sort_keys=True))


def is_finished(output_dir: str) -> bool:
    """Whether `output_dir` holds a finished run (its final save is complete)."""
    return is_done(output_dir)


def evaluation_finished(output_dir: str) -> bool:
    return is_done(os.path.join(output_dir, "eval"))


def holds_training(output_dir: str) -> bool:
    """Whether `output_dir` holds anything a run made by training: a checkpoint or a finished model. A run that
    stopped before its first step leaves only its `run_info.json`, which binds no later run."""
    if is_finished(output_dir):
        return True
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-\d+$")
    return os.path.isdir(output_dir) and any(pattern.match(name) for name in os.listdir(output_dir))


def _changed_settings(output_dir: str, current: dict) -> list[str]:
    path = os.path.join(output_dir, RUN_INFO)
    if not os.path.isfile(path) or not holds_training(output_dir):
        return []
    try:
        with open(path) as handle:
            recorded = json.load(handle).get("settings")
    except (OSError, ValueError):
        return []
    if not isinstance(recorded, dict):
        return []
    # Settings both runs know (a newer package may add fields: an older folder is not refused for them), compared as
    # saved: with their secrets redacted.
    current = redact(current)
    return [f"{key}: {recorded[key]!r} -> {current[key]!r}" for key in sorted(set(recorded) & set(current))
            if recorded[key] != current[key] and recorded[key] != "<redacted>"]


def check_output_dir(recipe) -> None:
    """Refuses an output folder the run cannot use, before anything loads: a file, an unwritable place, or a folder
    holding a run made with other settings (unless `overwrite_output_dir`)."""
    output_dir = recipe.config.output_dir
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise RecipeError(f"{recipe.path}: output_dir: {output_dir!r} is a file; name a folder.")
    existing = os.path.abspath(output_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError(f"{recipe.path}: output_dir: {output_dir!r} cannot be written ({existing} is not a "
                          "writable folder); choose another output_dir.")
    if recipe.options.get("overwrite_output_dir"):
        return
    changed = _changed_settings(output_dir, run_settings(recipe))
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise RecipeError(f"{recipe.path}: output_dir: {output_dir!r} holds a run made with other settings ({shown}). "
                          "Use another output_dir, or overwrite_output_dir=true to start over.")


def start_over_if_asked(recipe) -> None:
    """`overwrite_output_dir: true`: the earlier run's files go, once, in the process that starts the run (not again
    in the processes `kd-train` launches, nor on other ranks of a user's `accelerate launch`)."""
    if recipe.options["overwrite_output_dir"] and not launched_by_kd_train() and os.environ.get("RANK", "0") == "0":
        start_over(recipe.config.output_dir)


def start_over(output_dir: str) -> None:
    """Removes what an earlier run left in `output_dir` (`overwrite_output_dir: true`); the folder itself stays."""
    if not os.path.isdir(output_dir):
        return
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def checkpoint_problem(folder: str) -> str | None:
    """What is wrong with a checkpoint's files, or None: every safetensors file opens with its whole data present,
    every torch file is a complete archive, every JSON file parses."""
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(root, name)
            try:
                if name.endswith(".safetensors"):
                    with safe_open(path, framework="pt") as handle:
                        handle.keys()
                elif name.endswith((".pt", ".pth", ".bin")):
                    with zipfile.ZipFile(path) as archive:
                        archive.namelist()
                elif name.endswith(".json"):
                    with open(path) as handle:
                        json.load(handle)
            except Exception as error:  # any failure to read means "do not resume from here"
                return f"{os.path.relpath(path, folder)}: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    if not os.path.isfile(os.path.join(folder, "trainer_state.json")):
        return "trainer_state.json is missing"
    return None


def intact_checkpoint(output_dir: str, log=print) -> str | None:
    """The newest checkpoint of `output_dir` whose files are intact, or None. A damaged one is named; the main
    process renames it `checkpoint-N.damaged` so that no later resume or rotation takes it for a checkpoint."""
    if not os.path.isdir(output_dir):
        return None
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    steps = sorted((int(m.group(1)), name) for name in os.listdir(output_dir) if (m := pattern.match(name))
                   and os.path.isdir(os.path.join(output_dir, name)))
    for _, name in reversed(steps):
        folder = os.path.join(output_dir, name)
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log(f"Checkpoint {folder} is damaged ({problem}); resuming from an earlier one instead.")
        if os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0":
            try:
                os.replace(folder, folder + ".damaged")
            except OSError:
                pass
    return None


def save_final(trainer) -> None:
    """The trained model, tokenizer and arguments into `output_dir`, complete or not at all: every process saves to
    `output_dir/.staging/final/`, the main process moves each file in and then writes `done.json`."""
    output_dir = trainer.args.output_dir
    staging = os.path.join(output_dir, STAGING_DIR, "final")
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(staging)
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        for name in sorted(os.listdir(staging)):
            target = os.path.join(output_dir, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
        shutil.rmtree(staging, ignore_errors=True)
        write_done(output_dir, {"global_step": trainer.state.global_step, "max_steps": trainer.state.max_steps})
    trainer.accelerator.wait_for_everyone()
