"""Batches for on-policy distillation: the tokenized prompt + completion for the loss, and the prompt alone
(left-padded) for generating the on-policy completion, as TRL's `GKDTrainer` expects them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.utils import pad

from ..data.prompt_completion import (as_prompt, as_prompt_completion, has_completion, prompt_token_ids,
                                 tokenize_prompt_completion)


@dataclass
class PromptCompletionCollator:
    """Tokenizes raw prompt/completion (or messages) examples as TRL's `SFTTrainer` would.

    Returns `input_ids`, `attention_mask`, `labels` (`[B, T]`, right-padded, `-100` on prompt and padding) and
    `prompts`, `prompt_attention_mask` (`[B, P]`, left-padded, so generation continues right after each prompt).
    Sequences longer than `max_length` lose the end of their completion; an example whose prompt alone fills
    `max_length` is an error. A prompt-only example (no completion: on-policy data, where the student's sample
    replaces it) gets the end-of-sequence token as its placeholder completion.
    """

    tokenizer: Any
    max_length: int | None = 1024

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows = []
        for example in examples:
            if has_completion(example):
                prompt, completion = as_prompt_completion(example, "GKD")
                ids, prompt_length = tokenize_prompt_completion(self.tokenizer, prompt, completion)
            else:
                ids = prompt_token_ids(self.tokenizer, as_prompt(example))
                ids, prompt_length = ids + [self.tokenizer.eos_token_id], len(ids)
            if self.max_length is not None:
                ids = ids[: self.max_length]
            if prompt_length >= len(ids):
                raise ValueError(f"An example's prompt fills max_length={self.max_length} tokens, leaving no "
                                 "completion to distil: raise max_length or shorten the prompts.")
            rows.append((ids, prompt_length))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        sequences = [torch.as_tensor(ids, dtype=torch.long) for ids, _ in rows]
        labels = [ids.clone().index_fill_(0, torch.arange(prompt_length), -100)
                  for ids, (_, prompt_length) in zip(sequences, rows)]
        prompts = [ids[:prompt_length] for ids, (_, prompt_length) in zip(sequences, rows)]
        return {
            "input_ids": pad(sequences, pad_id),
            "attention_mask": pad([torch.ones_like(ids) for ids in sequences], 0),
            "labels": pad(labels, -100),
            "prompts": pad(prompts, pad_id, padding_side="left"),
            "prompt_attention_mask": pad([torch.ones_like(ids) for ids in prompts], 0, padding_side="left"),
        }
