"""Batched generation over a test split, with the settings recorded, and predictions saved as jsonl."""

from __future__ import annotations

import json
import os

import torch

from ..runtime.progress import progress_line
from ..data.prompt_completion import prompt_token_ids


DEFAULT_GENERATION = {"max_new_tokens": 128, "do_sample": False, "temperature": 1.0, "top_p": 1.0}


@torch.no_grad()
def generate_predictions(model, tokenizer, prompts: list, batch_size: int = 16, strip: bool = True,
                         progress: bool = True, **generation) -> list[str]:
    """Completions of `prompts` (text, or lists of chat messages), each given to the model exactly as training
    tokenizes a prompt (`prompt_token_ids`: the chat template with the generation prompt for messages), in
    left-padded batches; greedy unless `do_sample=True`, ending at the tokenizer's EOS (an instruct model's end of
    turn). Special tokens are removed, and surrounding whitespace too unless `strip=False` (training data keeps the
    completion's leading space). `progress=False`: no progress line (a generation inside a training step). The
    model is left in eval mode."""
    settings = {**DEFAULT_GENERATION, **generation}
    if not settings["do_sample"]:
        settings.pop("temperature"), settings.pop("top_p")
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    encoded_prompts = [prompt_token_ids(tokenizer, prompt) for prompt in prompts]
    outputs = []
    line = progress_line("generating", len(prompts), "prompts") if progress else None
    for start in range(0, len(prompts), batch_size):
        batch = encoded_prompts[start:start + batch_size]
        width = max(len(ids) for ids in batch)
        # Left padding: generation continues each prompt right after its last token.
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=device)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=pad_id,
                                   eos_token_id=tokenizer.eos_token_id, **settings)
        outputs += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        if line is not None:
            line.update(len(outputs))
    return [text.strip() for text in outputs] if strip else outputs


def empty_share(predictions: list[str]) -> float:
    """The share of predictions that are empty once stripped (0.0 for none)."""
    return sum(not text.strip() for text in predictions) / len(predictions) if predictions else 0.0


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
