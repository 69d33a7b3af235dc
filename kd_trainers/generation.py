"""Batched generation over a test split, with the settings recorded, and predictions saved as jsonl."""

from __future__ import annotations

import json
import os

import torch

from .progress import progress_line


DEFAULT_GENERATION = {"max_new_tokens": 128, "do_sample": False, "temperature": 1.0, "top_p": 1.0}


@torch.no_grad()
def generate_predictions(model, tokenizer, prompts: list[str], batch_size: int = 16, strip: bool = True,
                         **generation) -> list[str]:
    """Completions of `prompts` (left-padded batches; greedy unless `do_sample=True`), special tokens removed, and
    surrounding whitespace too unless `strip=False` (training data keeps the completion's leading space)."""
    settings = {**DEFAULT_GENERATION, **generation}
    if not settings["do_sample"]:
        settings.pop("temperature"), settings.pop("top_p")
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues each prompt right after its last token
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = []
    line = progress_line("generating", len(prompts), "prompts")
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True).to(model.device)
            generated = model.generate(**encoded, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                                       **settings)
            outputs += tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
            line.update(len(outputs))
    finally:
        tokenizer.padding_side = padding_side
    return [text.strip() for text in outputs] if strip else outputs


def save_predictions(path: str, prompts: list[str], references: list[str], predictions: list[str],
                     settings: dict) -> None:
    """`predictions.jsonl` (example_id, prompt, reference, prediction) and `generation.json` beside it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        for index, (prompt, reference, prediction) in enumerate(zip(prompts, references, predictions)):
            handle.write(json.dumps({"example_id": index, "prompt": prompt, "reference": reference,
                                     "prediction": prediction}) + "\n")
    with open(os.path.join(os.path.dirname(os.path.abspath(path)), "generation.json"), "w") as handle:
        json.dump(settings, handle, indent=2)


def load_predictions(path: str) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]
