"""What a recipe trains on: its labelled rows (`dataset_train_split`) and its prompts without labels (`prompts:`),
checked against the method before any model loads, and said in one line by `kd-train validate`.

How each method reads them:
- kd (Rev-KD too) and dskd: the labelled rows as they are, plus the teacher's completions of the prompts no labelled
  row asks (`kd_trainers.kd.prompt_rows`);
- seqkd: the teacher completes every prompt, the labelled rows' too: no completion of the data is read;
- gkd at lmbda=1 (or with seq_kd): every row is a prompt the student samples on;
- sft, and gkd with off-policy batches: labels only; prompt-only rows or a `prompts:` source are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset

from ..kd.prompt_rows import PromptRowsMixin, every_prompt_row, new_prompt_rows
from ..data.prompt_completion import require_labels, unlabelled_rows
from ..teachers.needs import stand_in
from .data import load_recipe_datasets, load_recipe_prompts, prompts_source


@dataclass
class TrainingData:
    train: Dataset
    evaluation: Dataset | None
    prompts: Dataset | None  # the `prompts:` rows, as loaded


def completes_prompts(trainer_class: type) -> bool:
    """Whether the method's teacher completes a `prompt_dataset` before training (the KD family)."""
    return issubclass(trainer_class, PromptRowsMixin)


def prompts_refusal(method: str, trainer_class: type, config) -> str | None:
    """Why a recipe of this method cannot take `prompts:` (None when it can)."""
    if completes_prompts(trainer_class):
        standing_in = stand_in(config)
        if standing_in is not None:
            return (f"the teacher completes the prompts before training, with the model in memory, and "
                    f"{standing_in[0]} stands in for it; name the model in teacher_model_name_or_path and drop "
                    f"{standing_in[0]}.")
        return None
    if not trainer_class.reads_labels(config):
        return None
    if method == "gkd":
        return (f"gkd at lmbda={config.lmbda} trains off-policy batches on labels; prompts need lmbda: 1 (every "
                "batch the student's samples) or seq_kd: true.")
    return (f"method {method!r} trains on labels and has no teacher to complete prompts; use seqkd (the teacher "
            "completes every prompt), kd or dskd (labelled rows plus the teacher's completions of the prompts), or "
            "gkd at lmbda: 1.")


def training_data(recipe) -> TrainingData:
    """The recipe's splits and prompts, refused (one line, before any model loads) where the method needs labels the
    rows lack."""
    train, evaluation = load_recipe_datasets(recipe.options)
    prompts = load_recipe_prompts(recipe.options)
    if recipe.trainer_class.reads_labels(recipe.config):
        split = recipe.options["dataset_train_split"]
        require_labels(train, f"method {recipe.method}", f"dataset_train_split {split!r}")
    return TrainingData(train, evaluation, prompts)


def trainer_data_kwargs(recipe, data: TrainingData) -> dict:
    """`train_dataset` (and `prompt_dataset`) as the method's trainer takes them."""
    if data.prompts is None:
        return {"train_dataset": data.train}
    if completes_prompts(recipe.trainer_class):
        return {"train_dataset": data.train, "prompt_dataset": data.prompts}
    # On-policy GKD: every row is a prompt; labelled rows give theirs, and the labels are not read.
    return {"train_dataset": every_prompt_row(data.train, data.prompts)}


def describe_training_rows(recipe, data: TrainingData) -> str:
    """One line: what each row will train on."""
    split = recipe.options["dataset_train_split"]
    labelled = len(data.train) - len(unlabelled_rows(data.train))
    rows = f"{len(data.train)} rows of {split!r}" + (f" ({labelled} labelled)" if labelled < len(data.train) else "")
    extra = ""
    if data.prompts is not None:
        new = len(new_prompt_rows(data.train, data.prompts))
        source = prompts_source(recipe.options)
        extra = (f" and {new} prompts of {source['split']!r} ({len(data.prompts) - new} of its {len(data.prompts)} "
                 "already asked by a row above or repeated)")
    if completes_prompts(recipe.trainer_class) and not recipe.trainer_class.reads_labels(recipe.config):
        return (f"trains on: the teacher's completions of the prompts of {rows}{extra}; no completion of the data is "
                "read.")
    if not recipe.trainer_class.reads_labels(recipe.config):
        return (f"trains on: the prompts of {rows}{extra}, each completed by the student's own sample and scored by "
                "the teacher; no completion of the data is read.")
    if data.prompts is not None:
        return (f"trains on: {rows} with their completions, {extra.removeprefix(' and ')}, each completed by the "
                "teacher first.")
    return f"trains on: {rows} with their completions."
