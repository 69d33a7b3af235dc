"""Two scores for the demo task: per-token NLL of the reference completions, and exact match of generated answers.

Small on purpose: the full evaluation suite (n-gram, embedding, judge metrics, statistics) is its own module.
"""

from __future__ import annotations

import re

import torch
from datasets import Dataset
from trl.trainer.utils import pad


def _prompt_and_full_ids(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(prompt).input_ids
    full_ids = tokenizer(prompt + completion).input_ids + [tokenizer.eos_token_id]
    return prompt_ids, full_ids


@torch.no_grad()
def completion_nll(model, tokenizer, dataset: Dataset, batch_size: int = 32) -> float:
    """Mean negative log-likelihood per completion token (prompt/completion rows), lower is better."""
    model.eval()
    total, count = 0.0, 0
    rows = list(dataset)
    for start in range(0, len(rows), batch_size):
        batch = [_prompt_and_full_ids(tokenizer, r["prompt"], r["completion"]) for r in rows[start:start + batch_size]]
        full_ids = [torch.tensor(full) for _, full in batch]
        input_ids = pad(full_ids, tokenizer.pad_token_id)
        attention = pad([torch.ones_like(ids) for ids in full_ids], 0)
        labels = pad([ids.clone().index_fill_(0, torch.arange(min(len(prompt), len(ids))), -100)
                      for ids, (prompt, _) in zip(full_ids, batch)], -100)
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)).logits.float()
        shift_labels = labels[:, 1:].to(model.device)
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shift_labels, reduction="sum",
                                                ignore_index=-100)
        total += nll.item()
        count += int((shift_labels != -100).sum())
    return total / max(count, 1)


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
