"""The demo task's final answer, and exact match of generated answers against it.

Small on purpose: the full evaluation suite (n-gram, embedding, judge metrics, statistics) is its own module.
"""

from __future__ import annotations

import re

import torch
from datasets import Dataset


def final_answer(text: str) -> str:
    """The demo's final answer: the number after "The answer is", else the text up to the first full stop."""
    match = re.search(r"answer is\s*(-?\d+)", text, flags=re.IGNORECASE)
    if match:
        return match.group(1)
    return text.strip().split(".")[0].strip().lower()


@torch.no_grad()
def exact_match(model, tokenizer, dataset: Dataset, max_new_tokens: int = 40, batch_size: int = 32) -> float:
    """Share of rows whose greedy generation has the reference final answer (`final_answer` of both)."""
    model.eval()
    tokenizer.padding_side = "left"
    hits = 0
    rows = list(dataset)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        encoded = tokenizer([r["prompt"] for r in batch], return_tensors="pt", padding=True).to(model.device)
        generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(generated[:, encoded.input_ids.shape[1]:], skip_special_tokens=True)
        for row, text in zip(batch, texts):
            hits += final_answer(text) == final_answer(row["completion"])
    tokenizer.padding_side = "right"
    return hits / max(len(rows), 1)
