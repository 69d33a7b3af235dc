"""Dual tokenization for cross-vocabulary methods (DSKD-CMA, ULD, GOLD, MinED): every example tokenized once per
tokenizer, with the response boundary on both sides, and, when asked, which completion tokens of the two sides cover
the same characters (or pair by edit distance).

Cross-vocabulary distillation compares the student's and the teacher's predictions over the *same* response text, so
each example becomes two token sequences, one per tokenizer, each with its own completion mask:

    {"prompt": ..., "completion": ...}
        -> input_ids / completion_mask                 (student tokenizer)
        -> teacher_input_ids / teacher_completion_mask (teacher tokenizer)

Tokenization follows TRL's `SFTTrainer` for prompt/completion data, so the student sees what an SFT or KD run of the
same data sees: the prompt alone and prompt + completion are tokenized (through the chat template for conversational
data), and the completion starts where the two diverge. Non-conversational completions get the tokenizer's EOS text.

Truncation keeps the two sides on the same text. Prompts are cut from the left to `max_prompt_length` tokens of each
tokenizer (they are context, never supervised). If a sequence is still longer than `max_length` on either side, the
completion *text* is cut at the longest character prefix whose tokenization fits both tokenizers (a binary search), so
both supervised tails end on the same character; a cut completion carries no EOS on either side.

With `align=True` each side also gets `aligned_group` / `teacher_aligned_group`: per token, the index of its aligned
group (`kd_trainers.data.alignment.aligned_groups` over the two completions' character offsets), `-1` on prompt
tokens. Group g of one side and group g of the other cover the same completion text.

With `edit_partners=True` the student side also gets `teacher_partner`: per token, the position in the teacher's
sequence of the one teacher completion token that MinED's edit-distance alignment pairs it with
(`kd_trainers.data.edit_distance.edit_distance_partners` over the two completions' token texts), `-1` where it pairs
with several and on the prompt.

With `keep_prompt=True` each row also keeps its prompt (`on_policy_prompt`, as JSON text: a string, or the chat
messages), from which an on-policy step has the student complete it and tokenizes the new example twice again.

The `text` format has no response boundary and is refused; `messages` is split into the conversation before the last
turn (the prompt) and the last turn, which must be the assistant's (the completion).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.utils import pad

from .alignment import aligned_groups
from .edit_distance import edit_distance_partners, token_texts
from .prompt_completion import as_prompt_completion, tokenize_prompt_completion


SIDES = (("student", ""), ("teacher", "teacher_"))
GROUP_COLUMNS = ("aligned_group", "teacher_aligned_group")
PARTNER_COLUMN = "teacher_partner"
PROMPT_COLUMN = "on_policy_prompt"
# Per-token columns padded with -1 (no group, no partner) by the collator.
POSITION_COLUMNS = (*GROUP_COLUMNS, PARTNER_COLUMN)


def _truncated_completion(completion, characters: int | None):
    if characters is None:
        return completion
    if isinstance(completion, str):
        return completion[:characters]
    return [*completion[:-1], {**completion[-1], "content": completion[-1]["content"][:characters]}]


def _completion_length(completion) -> int:
    return len(completion) if isinstance(completion, str) else len(completion[-1]["content"])


@dataclass
class DualTokenizer:
    """Maps an example to both tokenizations (see the module docstring). Use with `datasets.Dataset.map`."""

    student_tokenizer: Any
    teacher_tokenizer: Any
    max_length: int | None = 1024
    max_prompt_length: int | None = None
    align: bool = False
    edit_partners: bool = False
    keep_prompt: bool = False

    def _side(self, tokenizer, prompt, completion, truncated: bool) -> tuple[list[int], list[int], list | None]:
        """`(ids, completion mask, each token's character offsets from the completion's start or None)`."""
        ids, prompt_length, *offsets = tokenize_prompt_completion(tokenizer, prompt, completion, add_eos=not truncated,
                                                                  with_offsets=self.align)
        offsets = offsets[0] if offsets else None
        if self.max_prompt_length is not None and prompt_length > self.max_prompt_length:
            cut = prompt_length - self.max_prompt_length
            ids, offsets = ids[cut:], None if offsets is None else offsets[cut:]
            prompt_length = self.max_prompt_length
        return ids, [0] * prompt_length + [1] * (len(ids) - prompt_length), offsets

    def _both(self, prompt, completion, truncated: bool):
        return [self._side(tokenizer, prompt, completion, truncated)
                for tokenizer in (self.student_tokenizer, self.teacher_tokenizer)]

    def __call__(self, example: dict) -> dict[str, list[int]]:
        prompt, completion = as_prompt_completion(example)
        sides = self._both(prompt, completion, truncated=False)
        if self.max_length is not None and max(len(ids) for ids, _, _ in sides) > self.max_length:
            sides = self._fit(prompt, completion)
        (ids, mask, offsets), (teacher_ids, teacher_mask, teacher_offsets) = sides
        if 1 not in mask or 1 not in teacher_mask:
            raise ValueError(
                f"An example has no completion tokens left on the {'student' if 1 not in mask else 'teacher'} side "
                f"(max_length={self.max_length}, max_prompt_length={self.max_prompt_length}): its prompt alone fills "
                "max_length. Raise max_length or set max_prompt_length lower."
            )
        row = {"input_ids": ids, "completion_mask": mask,
               "teacher_input_ids": teacher_ids, "teacher_completion_mask": teacher_mask}
        if self.align:
            row.update(zip(GROUP_COLUMNS, _group_indices((mask, offsets), (teacher_mask, teacher_offsets))))
        if self.edit_partners:
            row[PARTNER_COLUMN] = self._partners(ids, mask, teacher_ids, teacher_mask)
        if self.keep_prompt:
            row[PROMPT_COLUMN] = json.dumps(prompt)
        return row

    def _partners(self, ids, mask, teacher_ids, teacher_mask) -> list[int]:
        """Each student token's partner in the teacher's sequence (see the module docstring)."""
        first, teacher_first = mask.index(1), teacher_mask.index(1)
        texts = [token_texts(tokenizer, tokenizer.convert_ids_to_tokens(side[start:]))
                 for tokenizer, side, start in ((self.student_tokenizer, ids, first),
                                                (self.teacher_tokenizer, teacher_ids, teacher_first))]
        partners = edit_distance_partners(*texts)
        return [-1] * first + [teacher_first + partner if partner >= 0 else -1 for partner in partners]

    def _fit(self, prompt, completion):
        """Both sides with the longest common completion text prefix that fits `max_length` on both."""
        low, high = 0, _completion_length(completion)  # invariant: `low` characters fit
        while low < high:
            middle = (low + high + 1) // 2
            sides = self._both(prompt, _truncated_completion(completion, middle), truncated=True)
            if max(len(ids) for ids, _, _ in sides) <= self.max_length:
                low = middle
            else:
                high = middle - 1
        return self._both(prompt, _truncated_completion(completion, low), truncated=True)


def _group_indices(*sides) -> list[list[int]]:
    """Per side, each token's aligned group over the completion tokens (`-1` on the prompt). `sides`: one
    `(completion mask, offsets)` per side; offsets are from the completion's start, so the prompt's are cut away and
    a completion token's end is never before 0."""
    completions = []
    for mask, offsets in sides:
        first = mask.index(1)
        completions.append((first, [(max(0, begin), max(0, end)) for begin, end in offsets[first:]]))
    groups = aligned_groups(completions[0][1], completions[1][1])
    indices = []
    for side, (first, completion) in enumerate(completions):
        row = [-1] * (first + len(completion))
        for number, group in enumerate(groups):
            for position in group[side]:
                row[first + position] = number
        indices.append(row)
    return indices


@dataclass
class DualTokenizationCollator:
    """Pads each side to its own longest sequence in the batch and builds both label tensors.

    Returns `input_ids`, `attention_mask`, `labels` (student, `[B, Ts]`) and `teacher_input_ids`,
    `teacher_attention_mask`, `teacher_labels` (`[B, Tt]`). Labels are the input ids with `-100` on prompt and padding
    positions, not shifted (the models shift them), as in TRL's collator. Examples that carry the aligned groups
    (`DualTokenizer(align=True)`) also give `aligned_group` `[B, Ts]` and `teacher_aligned_group` `[B, Tt]`, and those
    with the edit-distance partners `teacher_partner` `[B, Ts]`, each `-1` on the prompt and the padding; those that
    keep their prompt give `on_policy_prompt`, a list of `B` JSON texts.
    """

    student_pad_token_id: int
    teacher_pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        for (side, prefix), pad_id in zip(SIDES, (self.student_pad_token_id, self.teacher_pad_token_id)):
            sequences = [torch.as_tensor(example[f"{prefix}input_ids"], dtype=torch.long) for example in examples]
            labels = [ids.masked_fill(torch.as_tensor(example[f"{prefix}completion_mask"]) == 0, -100)
                      for ids, example in zip(sequences, examples)]
            batch[f"{prefix}input_ids"] = pad(sequences, pad_id, pad_to_multiple_of=self.pad_to_multiple_of)
            batch[f"{prefix}attention_mask"] = pad([torch.ones_like(ids) for ids in sequences], 0,
                                                   pad_to_multiple_of=self.pad_to_multiple_of)
            batch[f"{prefix}labels"] = pad(labels, -100, pad_to_multiple_of=self.pad_to_multiple_of)
        for column in POSITION_COLUMNS:
            if column in examples[0]:
                batch[column] = pad([torch.as_tensor(example[column], dtype=torch.long) for example in examples], -1,
                                    pad_to_multiple_of=self.pad_to_multiple_of)
        if PROMPT_COLUMN in examples[0]:
            batch[PROMPT_COLUMN] = [example[PROMPT_COLUMN] for example in examples]
        return batch


def with_completion(prompt, text: str) -> dict:
    """An example of `prompt` (a string, or chat messages) completed by `text`, in the prompt's own format."""
    return {"prompt": prompt, "completion": text if isinstance(prompt, str) else
            [{"role": "assistant", "content": text}]}
