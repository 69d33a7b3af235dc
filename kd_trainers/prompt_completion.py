"""Prompt/completion examples for the trainers that need the response boundary themselves (DSKD's two tokenizations,
GKD's prompts for on-policy generation, Seq-KD's teacher generation): any SFT format with a boundary, tokenized as TRL's
`SFTTrainer` tokenizes it."""

from __future__ import annotations

from typing import Any

from trl.data_utils import common_prefix_length


def is_conversational(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def as_prompt_completion(example: dict, method: str = "DSKD") -> tuple[Any, Any]:
    """`(prompt, completion)` of one example in any of the SFT formats that carry a response boundary."""
    if "prompt" in example and "completion" in example:
        return example["prompt"], example["completion"]
    if "messages" in example:
        messages = example["messages"]
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(
                f"{method} needs a response to distil: the last message of each 'messages' example must be the "
                f"assistant's, got role {messages[-1].get('role') if messages else None!r}. Use prompt/completion "
                "columns or end every conversation on an assistant turn."
            )
        return messages[:-1], messages[-1:]
    raise ValueError(
        f"{method} needs prompt/completion or messages data, got columns {sorted(example)}. The 'text' format has no "
        "response boundary: split each example into 'prompt' and 'completion' columns."
    )


def tokenize_prompt_completion(tokenizer, prompt, completion, *, add_eos: bool = True) -> tuple[list[int], int]:
    """`(input_ids, prompt_length)` as TRL's SFTTrainer tokenizes a prompt/completion example."""
    if is_conversational(prompt):
        prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    else:
        if add_eos and tokenizer.eos_token and not completion.endswith(tokenizer.eos_token):
            completion = completion + tokenizer.eos_token
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_ids = tokenizer(prompt + completion)["input_ids"]
    return full_ids, common_prefix_length(prompt_ids, full_ids)
