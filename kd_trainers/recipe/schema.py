"""Recipes: one YAML file per experiment, validated against the method's config before anything heavy happens.

A recipe's keys are the fields of the method's config class (`SFTConfig`, `KDConfig`, `DSKDConfig`, ...) plus the
recipe keys below. Every problem (an unknown key, a wrong type, a value out of range) is reported with the file, the
key, the value and, for unknown keys, the closest valid one. `key=value` overrides from the command line win over the
file; their values are read as YAML (`max_steps=10`, `bf16=false`, `peft.r=16` for a nested key).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig

from ..evaluation.answers import ANSWER_EXTRACTORS
from ..evaluation.score import METRICS, SUITES
from ..evaluation.settings import evaluation_settings
from ..runtime.checks import is_positive_integer
from ..runtime.guards import check_training_args
from ..methods import available_methods, get_method
from ..teachers.entries import check_routing, teacher_entries
from ..teachers.needs import stand_in
from ..runtime.smoke import capped_steps
from ..runtime.suggest import did_you_mean
from .errors import RecipeError
from .data import PROMPTS_KEYS
from .fields import FieldValueError, RecipeFields
from .launch import accelerate_config_path
from .yaml_files import read_recipe_values, read_yaml_mapping, refuse_study


def _key(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class RecipeOptions:
    """The keys a recipe has beyond its config's fields (their types, defaults and help, read like the config's)."""

    method: str | None = _key(None, "the training method: a registered one (kd_trainers.methods), e.g. kd, dskd, sft")
    model_name_or_path: str | None = _key(
        None, "the student (or, for sft, the model): Hub id, local path, or demo:ARCH/SIZE/TOKENIZER")
    tokenizer_name_or_path: str | None = _key(None, "the student's tokenizer, when not the model's")
    model_adapter_name_or_path: str | None = _key(
        None, "a LoRA adapter (e.g. from an SFT recipe) merged into the student before training: the S_SFT "
        "configurations")
    dataset_name: str = _key("demo", "Hub id, local file (.jsonl, .json, .csv, .parquet) or folder, or 'demo'")
    dataset_config: str | None = _key(None, "the dataset's configuration (for 'demo': its format, e.g. "
                                      "prompt_completion)")
    dataset_train_split: str = _key("train", "split to train on")
    dataset_test_split: str | None = _key(None, "split to evaluate on (sets eval_strategy='steps' unless set)")
    prompts: Any = _key(None, "prompts without labels beside the labelled rows: a split of dataset_name ('train', "
                        "'train[240:]') or {dataset_name, dataset_config, split, columns, prompt_template}; the "
                        "teacher completes them (kd, dskd, seqkd) or the student samples on them (gkd at lmbda 1); "
                        "their completions, if any, are never read")
    columns: dict | None = _key(None, "renames: {new_name: existing column}, e.g. {completion: answer}")
    prompt_template: str | None = _key(None, "builds the 'prompt' column from others, e.g. 'Q: {question}\\nA:'")
    peft: dict | None = _key(None, "LoRA settings (peft.LoraConfig fields): r, lora_alpha, lora_dropout, "
                             "target_modules...")
    teachers: Any = _key(None, "several teachers at once, each {model | cache | url: ..., weight: 1.0, "
                                 "name: ..., adapter: ...}: mixed per token by weight, or one per example by "
                                 "teacher_column (method kd)")
    merge_lora: bool = _key(False, "publish the model with its LoRA adapter merged (the output folder keeps the "
                            "adapter)")
    env: dict | None = _key(None, "environment variables set before anything runs")
    evaluation: dict | None = _key(None, "evaluate after training (one process): {metrics: [ngram, embedding, "
                                   "reasoning, judge, ...], answer_extractor, split, limit, max_new_tokens, "
                                   "batch_size, judge}")
    agreement: dict | None = _key(None, "log teacher-student agreement, fidelity and exact match while training: "
                                  "{every_steps, samples, max_new_tokens, batch_size, answer_extractor, split}")
    overwrite_output_dir: bool = _key(False, "start over in an output_dir that holds another run (its files are "
                                      "removed); without it a finished run is left alone and changed settings are "
                                      "refused")
    accelerate: dict | None = _key(None, "launch block: {config: zero2 | zero3 | zero3_offload | multi_process | "
                                   "single_process | PATH, num_processes: N}")


RECIPE_KEYS = tuple(option.name for option in dataclasses.fields(RecipeOptions))


@functools.lru_cache(maxsize=None)
def recipe_fields(config_class: type) -> tuple[RecipeFields, RecipeFields]:
    """The fields of a method's config and the recipe's own keys (parsed once per process: studies check many cells)."""
    return RecipeFields(config_class), RecipeFields(RecipeOptions)


ACCELERATE_KEYS = ("config", "num_processes")
AGREEMENT_KEYS = {"every_steps": 50, "samples": 32, "max_new_tokens": 64, "batch_size": 16,
                  "answer_extractor": "the_answer_is", "split": "test"}


def _agreement_settings(block: dict | None, method: str, path: str) -> dict | None:
    """The `agreement` block with its defaults (see `kd_trainers.evaluation.callbacks.AgreementCallback`)."""
    if block is None:
        return None
    if not get_method(method).needs_teacher:
        raise RecipeError(f"{path}: agreement: method {method!r} has no teacher to agree with; remove the block.")
    for key, value in block.items():
        if key not in AGREEMENT_KEYS:
            raise RecipeError(f"{path}: agreement.{key}: unknown key.{did_you_mean(key, AGREEMENT_KEYS)}")
        expected = type(AGREEMENT_KEYS[key])
        if not isinstance(value, expected) or (expected is int and not is_positive_integer(value)):
            raise RecipeError(f"{path}: agreement.{key}: {value!r} should be "
                              f"{'a positive integer' if expected is int else 'a string'}.")

    settings = {**AGREEMENT_KEYS, **block}
    if settings["answer_extractor"] not in ANSWER_EXTRACTORS:
        raise RecipeError(f"{path}: agreement.answer_extractor: {settings['answer_extractor']!r} is not one of "
                          f"{sorted(ANSWER_EXTRACTORS)}.")
    return settings


@dataclass
class Recipe:
    """A validated recipe: the method's config object plus the recipe keys."""

    path: str
    method: str
    config: Any  # an instance of the method's config class
    options: dict[str, Any] = field(default_factory=dict)  # the RecipeOptions values
    raw: dict[str, Any] = field(default_factory=dict)  # the merged file + overrides, as given
    hardware_notes: list[str] = field(default_factory=list)  # flags switched off by a portable check

    @property
    def trainer_class(self) -> type:
        return get_method(self.method).trainer_class

    @property
    def needs_teacher(self) -> bool:
        return get_method(self.method).needs_teacher



def load_recipe(path: str, overrides: list[str] | None = None, portable: bool = False) -> Recipe:
    """Read, merge and validate a recipe. Raises `RecipeError` before any model or dataset is loaded."""
    return validate_recipe(read_recipe_values(path, overrides), path, portable=portable)


HARDWARE_FLAGS = ("bf16", "fp16", "tf32", "bf16_full_eval", "fp16_full_eval")


def _needs_other_hardware(error: Exception) -> bool:
    message = str(error).lower()
    return any(word in message for word in ("bf16", "fp16", "tf32", "gpu", "cuda")) and (
        "support" in message or "requires" in message or "only available" in message)


def validate_recipe(values: dict, path: str = "<recipe>", portable: bool = False) -> Recipe:
    """The `Recipe` of merged recipe values. `portable=True` checks a recipe meant for other hardware (bf16 on a GPU
    machine) on this one: precision flags this machine cannot honour are switched off for the check only, and the
    switched-off flags are listed in `recipe.hardware_notes`."""
    refuse_study(values, path)
    method = values.get("method")
    methods = available_methods()
    if method not in methods:
        hint = did_you_mean(str(method), methods) if isinstance(method, str) else ""
        raise RecipeError(f"{path}: method: {method!r} is not a method; use one of {sorted(methods)}.{hint}")
    config_class = methods[method].config_class
    fields, option_fields = recipe_fields(config_class)
    # What the config takes only to refuse (a teacher kind its method cannot use): handed to it, which says why.
    refused_here = set(inspect.signature(config_class).parameters) - {f.name for f in dataclasses.fields(config_class)}
    config_values, options = {}, dataclasses.asdict(RecipeOptions())
    for key, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"{path}: {key}: {value!r} is not a finite number; give a finite value.")
        if key in refused_here:
            config_values[key] = value
            continue
        if key not in option_fields and key not in fields:
            hint = did_you_mean(key, set(fields) | set(RECIPE_KEYS))
            raise RecipeError(f"{path}: unknown key {key!r} (value {value!r}) for method {method!r}.{hint}")
        target, known = (options, option_fields) if key in option_fields else (config_values, fields)
        try:
            target[key] = known.coerce(key, value)
        except FieldValueError as error:
            raise RecipeError(f"{path}: {key}: {error}") from None
    if not options.get("model_name_or_path"):
        raise RecipeError(f"{path}: model_name_or_path is missing: the model to train (a Hub id, a local path, or "
                          "demo:llama/student/bpe for the built-in demo).")
    if options["evaluation"] is not None:
        options["evaluation"] = evaluation_settings(options["evaluation"], path, RecipeError)
    _check_peft(options["peft"], path)
    _check_accelerate(options["accelerate"], path)
    options["agreement"] = _agreement_settings(options["agreement"], method, path)
    if options["env"]:
        bad = {k: v for k, v in options["env"].items() if not isinstance(v, (str, int, float, bool))}
        if bad:
            raise RecipeError(f"{path}: env: values must be strings or numbers, got {bad!r}.")
    config_values.setdefault("output_dir", os.path.join("outputs", os.path.splitext(os.path.basename(path))[0]))
    if config_values.get("eval_strategy", "no") not in ("no", None) and not options.get("dataset_test_split"):
        raise RecipeError(f"{path}: eval_strategy: {config_values['eval_strategy']!r} evaluates during training, but "
                          "dataset_test_split names no split to evaluate on; set dataset_test_split (e.g. test) or "
                          "eval_strategy: no.")
    if options["teachers"] is not None:
        _check_teachers(options, config_values, method, path)
    if methods[method].needs_teacher and config_values.get("teacher_model_name_or_path") is None \
            and config_values.get("teacher_cache") is None and config_values.get("teacher_url") is None \
            and options["teachers"] is None:
        raise RecipeError(f"{path}: teacher_model_name_or_path is missing: method {method!r} needs a teacher (or a "
                          "teacher_cache written by one, or a teacher_url serving one).")
    _fit_process_group(config_values, path)
    notes = []
    try:
        try:
            with warnings.catch_warnings():  # TRL's own default (gradient_checkpointing) uses transformers' old name
                warnings.filterwarnings("ignore", message="`gradient_checkpointing", category=FutureWarning)
                config = config_class(**config_values)
        except ValueError as error:
            if not (portable and _needs_other_hardware(error)):
                raise
            notes = [f"{flag}={config_values[flag]} needs other hardware ({error})" for flag in HARDWARE_FLAGS
                     if config_values.get(flag)]
            config = config_class(**{**config_values, **{flag: False for flag in HARDWARE_FLAGS
                                                          if flag in config_values}})
    except (ValueError, TypeError) as error:
        message = str(error)
        # The field the config complained about: named in its message, else the one whose value it quotes.
        key = next((k for k in sorted(config_values, key=len, reverse=True) if k in message), None) or next(
            (k for k, v in config_values.items() if isinstance(v, str) and len(v) > 1 and v in message), None)
        where = f"{key}: {config_values[key]!r}: " if key and not message.startswith(f"{key}:") else ""
        raise RecipeError(f"{path}: {where}{message}") from None

    if options["agreement"] and not getattr(config, "holds_teacher_while_training", lambda: True)():
        standing_in = stand_in(config)
        if standing_in is not None:
            why, fix = f"{standing_in[0]}={standing_in[1]!r} stands in for the teacher", f"drop {standing_in[0]}"
        else:
            why, fix = "the teacher is released once it has generated", "set kd_weight > 0"
        raise RecipeError(f"{path}: agreement: method {method!r} holds no teacher while training ({why}); remove the "
                          f"block and score agreement after training (evaluation: metrics: [agreement]), or {fix}.")
    _check_teacher_metrics(options, config, method, path)
    _check_prompts(options, config, method, path)
    try:
        check_training_args(config)
    except ValueError as error:
        raise RecipeError(f"{path}: {error}") from None
    try:
        config.max_steps = capped_steps(config.max_steps)  # a smoke run: resolved, so recorded and keyed as such
    except ValueError as error:
        raise RecipeError(str(error)) from None
    return Recipe(path=path, method=method, config=config, options=options, raw=values, hardware_notes=notes)


def _fit_process_group(config_values: dict, path: str) -> None:
    """The process-group settings for where the recipe is being read. In a single process (the launcher's parent, or
    `kd-train validate`) no `ddp_backend`: setting one would make the config try to join a group that does not exist.
    Several processes on a machine without CUDA need gloo (NCCL needs GPUs) and, outside DeepSpeed, `use_cpu`:
    without it accelerate sets up no distributed training there, and every process trains a copy of its own. FSDP
    does not shard over CPU processes at all (accelerate falls back to DDP), so it is refused. Without CUDA,
    `dataloader_pin_memory` defaults to off: pinning needs an accelerator, and torch would only warn."""
    if not torch.cuda.is_available():
        # Pinning needs an accelerator; without one torch only warns at every data loader.
        config_values.setdefault("dataloader_pin_memory", False)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        config_values.pop("ddp_backend", None)
        return
    if torch.cuda.is_available():
        return
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise RecipeError(f"{path}: accelerate: FSDP needs CUDA devices: on this machine accelerate would not shard "
                          "the model (it runs DDP with use_cpu, else every process alone). Use accelerate.config "
                          "zero2 or zero3 to shard, or multi_process for DDP.")
    if config_values.get("ddp_backend") is None:
        config_values["ddp_backend"] = "gloo"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        config_values["use_cpu"] = True


def _check_teacher_metrics(options: dict, config, method: str, path: str) -> None:
    """Metrics that compare with the teacher's answers need a teacher in memory to generate them after training."""
    named = (options["evaluation"] or {}).get("metrics") or []
    metrics = [metric for name in named for metric in SUITES.get(name, [name])]
    versus = [metric for metric in metrics if metric in METRICS and METRICS[metric][2] == "teacher_predictions"]
    if versus and get_method(method).needs_teacher and getattr(config, "teacher_model_name_or_path", None) is None:
        raise RecipeError(
            f"{path}: evaluation.metrics: {versus} compare the student's answers with the teacher's, which the "
            "teacher in memory generates after training, and teacher_model_name_or_path is null (a cache, a server "
            "or several teachers stand in for it). " + (
                f"Drop {versus}: several teachers give no one teacher's answers." if options.get("teachers") else
                "Name the teacher there (a cache or a server still serves the training; the model loads only to "
                f"answer), or drop {versus}."))


def _check_prompts(options: dict, config, method: str, path: str) -> None:
    """A `prompts:` source: well formed, and for a method that reads prompts (`recipe.training_rows`)."""
    block = options["prompts"]
    if block is None:
        return
    if isinstance(block, dict):
        for key, value in block.items():
            if key not in PROMPTS_KEYS:
                raise RecipeError(f"{path}: prompts.{key}: unknown key (value {value!r})."
                                  f"{did_you_mean(key, PROMPTS_KEYS)}")
    elif not isinstance(block, str) or not block.strip():
        raise RecipeError(f"{path}: prompts: {block!r} should be a split of dataset_name (e.g. train or train[240:]) "
                          f"or a mapping of {list(PROMPTS_KEYS)}.")
    from .training_rows import prompts_refusal  # lazy: imports the method's trainer, only for a recipe with prompts

    why = prompts_refusal(method, get_method(method).trainer_class, config)
    if why:
        raise RecipeError(f"{path}: prompts: {why}")
    if options["teachers"] is not None:
        raise RecipeError(f"{path}: prompts: the teacher completes the prompts, and teachers: lists several; name one "
                          "teacher (teacher_model_name_or_path) or drop prompts.")


def _check_teachers(options: dict, config_values: dict, method: str, path: str) -> None:
    """A `teachers:` block: method kd, each entry checked (`teachers.entries.teacher_entries`), no other teacher."""
    if method != "kd":
        raise RecipeError(f"{path}: teachers: method {method!r} takes one teacher; several teachers are for method "
                          "kd.")
    try:
        entries = teacher_entries(options["teachers"], "teachers")
        check_routing(entries, config_values.get("teacher_column"), "teachers")
    except ValueError as error:
        raise RecipeError(f"{path}: {error}") from None
    if options["agreement"]:
        raise RecipeError(f"{path}: agreement: logs agreement with one teacher, and teachers: lists several; remove "
                          "the block (score agreement after training against one of them with kd-eval).")
    named = [key for key in ("teacher_model_name_or_path", "teacher_cache", "teacher_url")
             if config_values.get(key) is not None]
    if named:
        raise RecipeError(f"{path}: teachers: lists the teachers, and {', '.join(named)} names one more: give them "
                          "all in teachers (or set it to null).")


def _check_peft(peft: dict | None, path: str) -> None:
    if not peft:
        return

    valid = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    for key, value in peft.items():
        if key not in valid:
            raise RecipeError(f"{path}: peft.{key}: unknown LoRA setting (value {value!r}).{did_you_mean(key, valid)}")
    try:
        LoraConfig(**peft)
    except (ValueError, TypeError) as error:
        raise RecipeError(f"{path}: peft: {error}") from None


def _check_accelerate(block: dict | None, path: str) -> None:
    if not block:
        return

    for key in block:
        if key not in ACCELERATE_KEYS:
            raise RecipeError(f"{path}: accelerate.{key}: unknown key (value {block[key]!r})."
                              f"{did_you_mean(key, ACCELERATE_KEYS)}")
    config_path = accelerate_config_path(block.get("config", "single_process"), path)
    processes = block.get("num_processes", 1)
    if not is_positive_integer(processes):
        raise RecipeError(f"{path}: accelerate.num_processes: {processes!r} should be a positive integer.")
    settings = read_yaml_mapping(config_path, RecipeError)
    if settings.get("distributed_type") == "MULTI_CPU" and max(processes, settings.get("num_processes", 1)) > 1:
        raise RecipeError(f"{path}: accelerate.config: {block.get('config')!r} is a MULTI_CPU config, which "
                          "`accelerate launch` starts as one process (several need mpirun): the run would not be "
                          "distributed. Use accelerate.config multi_process, which runs several processes over gloo "
                          "on CPU.")
    if settings.get("distributed_type") == "FSDP" and not torch.cuda.is_available():
        raise RecipeError(f"{path}: accelerate.config: {block.get('config')!r} is an FSDP config, and FSDP needs "
                          "CUDA devices: on this machine accelerate would not shard the model. Use accelerate.config "
                          "zero2 or zero3 to shard on CPU, or multi_process for DDP.")
