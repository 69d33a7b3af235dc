"""Batches for on-policy distillation: the tokenized prompt + completion for the loss, and the prompt alone
(left-padded) for generating the on-policy completion, as TRL's `GKDTrainer` expects them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..prompt_completion import as_prompt_completion, tokenize_prompt_completion


@dataclass
class PromptCompletionCollator:
    """Tokenizes raw prompt/completion (or messages) examples as TRL's `SFTTrainer` would.

    Returns `input_ids`, `attention_mask`, `labels` (`[B, T]`, right-padded, `-100` on prompt and padding) and
    `prompts`, `prompt_attention_mask` (`[B, P]`, left-padded, so generation continues right after each prompt).
    Sequences longer than `max_length` lose the end of their completion; an example whose prompt alone fills
    `max_length` is an error.
    """

    tokenizer: Any
    max_length: int | None = 1024

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = []
        for example in examples:
            prompt, completion = as_prompt_completion(example, "GKD")
            ids, prompt_length = tokenize_prompt_completion(self.tokenizer, prompt, completion)
            if self.max_length is not None:
                ids = ids[: self.max_length]
            if prompt_length >= len(ids):
                raise ValueError(f"An example's prompt fills max_length={self.max_length} tokens, leaving no "
                                 "completion to distil: raise max_length or shorten the prompts.")
            rows.append((ids, prompt_length))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        length = max(len(ids) for ids, _ in rows)
        prompt_width = max(prompt_length for _, prompt_length in rows)
        batch = {
            "input_ids": torch.full((len(rows), length), pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((len(rows), length), dtype=torch.long),
            "labels": torch.full((len(rows), length), -100, dtype=torch.long),
            "prompts": torch.full((len(rows), prompt_width), pad_id, dtype=torch.long),
            "prompt_attention_mask": torch.zeros((len(rows), prompt_width), dtype=torch.long),
        }
        for row, (ids, prompt_length) in enumerate(rows):
            ids = torch.as_tensor(ids, dtype=torch.long)
            batch["input_ids"][row, : len(ids)] = ids
            batch["attention_mask"][row, : len(ids)] = 1
            batch["labels"][row, prompt_length: len(ids)] = ids[prompt_length:]
            batch["prompts"][row, prompt_width - prompt_length:] = ids[:prompt_length]
            batch["prompt_attention_mask"][row, prompt_width - prompt_length:] = 1
        return batch
