"""Prompt/completion examples for everything that needs the response boundary itself (DSKD's two tokenizations, GKD's
prompts for on-policy generation, Seq-KD's teacher generation, evaluation, agreement, the teacher's answers): any SFT
format with a boundary, tokenized as TRL's `SFTTrainer` tokenizes it.

`prompt_token_ids` is the one prompt formatter for generation: the prompt's token ids exactly as training sees them
(TRL's `_tokenize`: the chat template with the generation prompt for conversational prompts, the tokenizer's own
special tokens for plain text), so that a model is asked what it was trained to answer."""

from __future__ import annotations

import os
from typing import Any

from trl.data_utils import _tokenize, common_prefix_length

from .alignment import require_fast_tokenizer


def is_conversational(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def has_completion(example: dict) -> bool:
    """Whether a row carries its label: a `completion` (not null), `messages` ending on the assistant's turn, or any
    other format SFT trains on whole (`text`, tokenized `input_ids`). A row with a `prompt` (or `messages`) and none
    of these is a prompt-only row."""
    if "input_ids" in example or example.get("text") is not None or example.get("completion") is not None:
        return True
    messages = example.get("messages")
    if messages is not None:
        return bool(messages) and messages[-1].get("role") == "assistant"
    return "prompt" not in example


def as_prompt(example: dict):
    """The prompt of any row with one: a `prompt` (its completion, if any, is not read), or `messages` up to the
    assistant's last turn (all of them in a prompt-only row)."""
    if example.get("prompt") is not None:
        return example["prompt"]
    messages = example.get("messages")
    if messages:
        return messages[:-1] if messages[-1].get("role") == "assistant" else messages
    raise ValueError(f"A row needs a 'prompt' or 'messages' to be asked anything, got columns {sorted(example)}.")


PROMPT_READERS = ("seqkd (the teacher completes every prompt) and gkd at lmbda=1 (the student samples, the teacher "
                  "scores)")


def unlabelled_rows(dataset) -> list[int]:
    """Indices of the prompt-only rows (`has_completion` false), read column by column (no row decoding): none in a
    `text` or tokenized dataset."""
    columns = set(dataset.column_names)
    if "input_ids" in columns or "text" in columns:
        return []
    if "completion" in columns:
        return [i for i, completion in enumerate(dataset["completion"]) if completion is None]
    if "messages" in columns:
        return [i for i, messages in enumerate(dataset["messages"])
                if not messages or messages[-1].get("role") != "assistant"]
    return list(range(len(dataset))) if "prompt" in columns else []


def require_labels(dataset, method: str, where: str = "train_dataset") -> None:
    """Refuse data with prompt-only rows for a method that trains on labels, naming the rows and the methods and
    arguments that take prompts alone. Called before any model is loaded."""
    if not getattr(dataset, "column_names", None) or not hasattr(dataset, "__len__"):
        return  # no data, or a stream (an IterableDataset): its rows are not read ahead of training
    rows = unlabelled_rows(dataset)
    if rows:
        raise ValueError(
            f"{method} trains on labels, but {where} has {len(rows)} of {len(dataset)} rows with a prompt and no "
            f"completion (first: row {rows[0]}). Prompts alone train with {PROMPT_READERS}; beside labelled rows "
            "they are the teacher's to complete: prompt_dataset= in Python, `prompts:` in a recipe (kd, rev_kd, "
            "dskd, seqkd).")


def as_prompt_completion(example: dict, method: str = "DSKD") -> tuple[Any, Any]:
    """`(prompt, completion)` of one example in any of the SFT formats that carry a response boundary."""
    if "prompt" in example and "completion" in example:
        return example["prompt"], example["completion"]
    if "messages" in example:
        messages = example["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(
                f"{method} needs each example's response: the last message of each 'messages' example must be the "
                f"assistant's, got role {messages[-1].get('role') if messages else None!r}. Use prompt/completion "
                "columns or end every conversation on an assistant turn."
            )
        return messages[:-1], messages[-1:]
    raise ValueError(
        f"{method} needs prompt/completion or messages data, got columns {sorted(example)}. The 'text' format has no "
        "response boundary: split each example into 'prompt' and 'completion' columns."
    )


def tokenize_prompt_completion(tokenizer, prompt, completion, *, add_eos: bool = True, with_offsets: bool = False):
    """`(input_ids, prompt_length)` as TRL's SFTTrainer tokenizes a prompt/completion example.

    With `with_offsets`, a third item: each token's `(start, end)` characters counted from where the completion's
    text starts in the rendered example (a prompt token's are negative), so that two tokenizers' offsets of one
    example share a coordinate system over the completion (`kd_trainers.data.alignment`). Needs a fast tokenizer."""
    if with_offsets:
        require_fast_tokenizer(tokenizer)
    if is_conversational(prompt):
        prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        special = {"add_special_tokens": False}
    else:
        if add_eos and tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
            completion = completion + tokenizer.eos_token
        prompt_text, full_text, special = prompt, prompt + completion, {}
    prompt_ids = tokenizer(prompt_text, **special)["input_ids"]
    full = tokenizer(full_text, return_offsets_mapping=with_offsets, **special)
    full_ids = full["input_ids"]
    prompt_length = common_prefix_length(prompt_ids, full_ids)
    if not with_offsets:
        return full_ids, prompt_length
    # Where the completion's characters start: after the rendered prompt (a chat template may render the prompt's
    # last turn differently once an answer follows; then after the two texts' common prefix).
    start = len(prompt_text) if full_text.startswith(prompt_text) else len(os.path.commonprefix([prompt_text,
                                                                                                 full_text]))
    return full_ids, prompt_length, [(begin - start, end - start) for begin, end in full["offset_mapping"]]


def prompt_token_ids(tokenizer, prompt) -> list[int]:
    """The token ids of `prompt` (text, or a list of messages) as TRL's `SFTTrainer` tokenizes the prompt part of a
    training example: what generation continues."""
    if is_conversational(prompt):
        return list(_tokenize(tokenizer, prompt, add_generation_prompt=True)["input_ids"])
    if isinstance(prompt, str):
        return list(_tokenize(tokenizer, prompt)["input_ids"])
    raise ValueError(f"A prompt must be text or a list of chat messages, got {type(prompt).__name__}: {prompt!r:.80}")


def completion_text(completion) -> str:
    """A completion as text: itself, or the content of its messages (a conversational completion)."""
    if is_conversational(completion):
        return "".join(str(message.get("content") or "") for message in completion)
    return completion


def prompts_and_references(dataset, method: str = "Evaluation") -> tuple[list, list[str]]:
    """`(prompts, reference texts)` of a split in any SFT format with a response boundary: prompt/completion columns
    (plain or conversational) or `messages` ending on the assistant's turn."""
    pairs = [as_prompt_completion(example, method) for example in dataset]
    return [prompt for prompt, _ in pairs], [completion_text(completion) for _, completion in pairs]


def check_generation_format(dataset, tokenizer, split: str, method: str = "Evaluation") -> None:
    """Fail, naming the split and the fix, when `split` cannot be given to the model as prompts: no response
    boundary, or a conversational prompt and a tokenizer without a chat template."""
    if len(dataset) == 0:
        return
    example = dataset[0]
    try:
        prompt, _ = as_prompt_completion(example, method)
    except ValueError as error:
        raise ValueError(f"{split}: {error}") from None
    if is_conversational(prompt) and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{split}: the prompts are chat messages, but the tokenizer has no chat template to format "
                         "them with; set chat_template on the tokenizer, or use plain prompt/completion text.")
