"""Prompts without labels, the channel distillation works by: the teacher completes them before training.

People distil because they have many prompts, few labels and a teacher that can answer. A KD trainer takes the
prompts as `prompt_dataset=` (a recipe's `prompts:`), beside the labelled `train_dataset`:

- KD, Rev-KD and DSKD: the teacher completes each prompt that no labelled row already asks (greedy, up to
  `max_length` tokens, cached by content in `$KD_TRAINERS_CACHE/seqkd`); the student trains on the labelled rows as
  they are plus the completed prompts, with the method's loss on both;
- Seq-KD: every prompt, labelled or not, is completed by the teacher (Kim & Rush): labels are never read, so its
  `train_dataset` may be prompts alone.

A method that trains on labels refuses a `train_dataset` with prompt-only rows before anything is loaded, naming the
rows and the methods that take prompts (`kd_trainers.data.prompt_completion.require_labels`).
"""

from __future__ import annotations

import gc
import json

from accelerate import PartialState
from datasets import Dataset, concatenate_datasets

from ..data.prompt_completion import as_prompt, as_prompt_completion, require_labels
from ..runtime.smoke import capped_prompts
from ..teachers.loading import freeze, model_name
from ..teachers.needs import stand_in
from ..data.teacher_completions import teacher_generated_dataset


def prompt_key(prompt) -> str:
    """A prompt (text or messages) as a comparable string."""
    return json.dumps(prompt, sort_keys=True)


def new_prompt_rows(labelled: Dataset | None, prompts: Dataset, keep_repeats: bool = False) -> Dataset:
    """The rows of `prompts` whose prompt no row of `labelled` asks (the label wins), as prompt-only rows: `prompt`
    (text or messages) and the other columns, never a completion (a `completion` or assistant turn is dropped unread).
    A prompt repeated within `prompts` is kept once, unless `keep_repeats`."""
    asked = {prompt_key(as_prompt(row)) for row in labelled} if labelled is not None else set()
    rows, seen = [], set()
    for row in prompts:
        prompt = as_prompt(row)
        key = prompt_key(prompt)
        if key in asked or (key in seen and not keep_repeats):
            continue
        seen.add(key)
        rows.append({**{k: v for k, v in row.items() if k not in ("prompt", "completion", "messages")},
                     "prompt": prompt})
    return Dataset.from_list(rows)


def every_prompt_row(train: Dataset | None, prompts: Dataset | None) -> Dataset:
    """Every prompt to train on, as prompt-only rows: those of `train` (labelled or not, repeats kept), then those of
    `prompts` that `train` does not ask, with the columns both have (what Seq-KD completes and on-policy GKD samples
    on)."""
    parts = [part for part in (new_prompt_rows(None, train, keep_repeats=True) if train is not None else None,
                               new_prompt_rows(train, prompts) if prompts is not None else None)
             if part is not None and len(part)]
    common = [name for name in parts[0].column_names if all(name in part.column_names for part in parts)]
    return concatenate_datasets([part.select_columns(common) for part in parts]) if len(parts) > 1 else parts[0]


def joined_rows(labelled: Dataset | None, completed: Dataset) -> Dataset:
    """Labelled rows and teacher-completed rows as one prompt/completion dataset, with the columns both have."""
    if labelled is None or len(labelled) == 0:
        return completed
    if "text" in labelled.column_names:
        raise ValueError("prompt_dataset beside 'text' rows: a text row has no prompt/completion boundary to join the "
                         "teacher's completions to; give the labelled rows as prompt/completion or messages.")
    labelled_rows = [{**row, **dict(zip(("prompt", "completion"), as_prompt_completion(row, "KD")))}
                     for row in labelled]
    columns = [name for name in completed.column_names
               if name in labelled_rows[0] and name != "messages"]
    return Dataset.from_list([{name: row[name] for name in columns} for row in labelled_rows]
                             + [{name: row[name] for name in columns} for row in completed])


class PromptRowsMixin:
    """The prompt rows of a KD trainer (`KDTrainer.__init__` calls `_check_training_rows` first, then
    `_prepare_training_data` after the teacher plan)."""

    _generation_teacher = None
    completions_dir = None  # the teacher's completed prompts (a `datasets.load_from_disk` folder), when it made any

    @classmethod
    def reads_labels(cls, args) -> bool:
        """Whether the method trains on the labelled rows' completions (Seq-KD and on-policy GKD do not)."""
        return True

    def _check_training_rows(self, args, train_dataset, prompt_dataset) -> None:
        """Before any model or dataset preparation: prompt-only rows where labels are needed, and prompts where no
        teacher in memory can complete them."""
        if self.reads_labels(args):
            require_labels(train_dataset, self._name)
        if prompt_dataset is None:
            return
        if not isinstance(prompt_dataset, Dataset):
            raise ValueError("prompt_dataset must be a datasets.Dataset of prompts, got "
                             f"{type(prompt_dataset).__name__}.")
        standing_in = stand_in(args)
        field = standing_in[0] if standing_in is not None else "teacher_models" if self._teacher_entries else None
        if field is not None:
            raise ValueError(f"prompt_dataset with {field}: the teacher completes the prompts before training, with "
                             "the model in memory; name it with teacher_model (or teacher_model_name_or_path) and "
                             f"drop {field}, or complete the prompts with that teacher first.")

    def _completion_settings(self, args) -> tuple[dict, int, str | None]:
        """`(generation settings, batch size, cache folder)` the teacher completes prompts with: greedy, up to the
        `max_length` tokens training keeps (Seq-KD: its `seqkd_*` settings)."""
        return {"max_new_tokens": args.max_length or 1024, "do_sample": False}, args.per_device_eval_batch_size, None

    def _teacher_completions(self, plan, args, prompts: Dataset) -> Dataset:
        """The teacher (loaded now, kept for the loss when the method needs it) completes `prompts` (the first
        `kd_trainers.smoke.PROMPTS` in a smoke run)."""
        prompts = prompts.select(range(capped_prompts(len(prompts))))
        teacher = freeze(self._load_teacher_model(plan.source, args))
        state = PartialState()
        settings, batch_size, cache_dir = self._completion_settings(args)
        generated, self.completions_dir = teacher_generated_dataset(
            teacher, plan.tokenizer, prompts, settings, cache_dir,
            teacher_id=f"{model_name(plan.source)}|{args.teacher_adapter_name_or_path}",
            batch_size=batch_size, state=state if state.num_processes > 1 else None,
            log=lambda message: print(message, flush=True) if state.is_main_process else None)
        # The loss reuses the loaded teacher; a method that trains on text alone lets it go now.
        self._generation_teacher = teacher if args.kd_weight > 0 else None
        del teacher
        gc.collect()
        return generated

    def _prepare_training_data(self, plan, args, sft_kwargs: dict, prompt_dataset: Dataset | None) -> dict:
        """SFTTrainer's keyword arguments with the data the student trains on: the labelled rows as given, plus the
        teacher's completions of the prompts no labelled row asks."""
        if prompt_dataset is None:
            return sft_kwargs
        labelled = sft_kwargs.get("train_dataset")
        prompts = new_prompt_rows(labelled, prompt_dataset)
        if PartialState().is_main_process:
            print(f"[completions] the teacher completes {len(prompts)} prompts ({len(prompt_dataset) - len(prompts)} "
                  f"of {len(prompt_dataset)} already asked by a labelled row or repeated)", flush=True)
        completed = self._teacher_completions(plan, args, prompts) if len(prompts) else None
        if completed is None:
            return sft_kwargs
        return {**sft_kwargs, "train_dataset": joined_rows(labelled, completed)}

    def _load_teacher_model(self, teacher, args):
        """The teacher that completed the prompts, when there is one (loaded once), else loaded now."""
        loaded, self._generation_teacher = self._generation_teacher, None
        return loaded if loaded is not None else super()._load_teacher_model(teacher, args)


__all__ = ["PromptRowsMixin", "every_prompt_row", "joined_rows", "new_prompt_rows", "prompt_key"]
