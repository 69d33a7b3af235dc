"""The teacher's completions of prompts, as a reusable dataset folder, cached and resumable: Seq-KD's training set, and
the prompt-only rows (`prompt_dataset`, a recipe's `prompts:`) that KD, Rev-KD and DSKD train on beside labelled rows.

    <cache>/<key>/parts/part-00000.jsonl ...   written block by block (atomically), so an interrupted run resumes
    <cache>/<key>/dataset/                     `datasets.load_from_disk` folder: prompt, completion (+ the rest)
    <cache>/<key>/generation.json              teacher, adapter, settings, number of examples
    <cache>/<key>/done.json                    written last

`key` hashes the teacher, its adapter, the prompts and the generation settings: the same sweep finds the same set.
With several processes each generates its share of blocks; the main process assembles the dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil

import torch
from datasets import Dataset, load_from_disk
from filelock import FileLock

from ..runtime.files import DONE, user_cache_dir, write_atomically, write_done
from ..models.generation import generate_predictions
from .prompt_completion import as_prompt, completion_text, is_conversational, prompt_token_ids


BLOCK_BATCHES = 8  # generation batches per part file: the unit of resumption


def _gathered(model):
    """All of a ZeRO-3-partitioned model's weights on every rank while generating (no collectives inside generate,
    so ranks may generate different numbers of blocks); a no-op for a whole model."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(model.parameters()))
    return contextlib.nullcontext()


def teacher_generated_dataset(teacher, tokenizer, dataset: Dataset, settings: dict, cache_dir: str | None,
                              teacher_id: str, batch_size: int = 16, state=None, log=print) -> tuple[Dataset, str]:
    """`(dataset, folder)`: `dataset` with each completion replaced by the teacher's.

    Args:
        teacher: the (frozen) teacher model; `tokenizer` its tokenizer.
        dataset: prompt/completion, prompt-only or messages data (a row's own completion is never read); its other
            columns are kept.
        settings: `SeqKDConfig.generation_settings()` (max_new_tokens, do_sample, temperature, top_p, seed).
        batch_size: prompts per generation batch (not part of the cache key).
        teacher_id: what identifies the teacher in the cache key (name and adapter).
        state: an accelerate `PartialState` for multi-process runs (None: one process).
    """
    prompts = [as_prompt(example) for example in dataset]
    # Keyed by the prompts as the teacher reads them (its chat template applied): another template is another set.
    material = json.dumps({"teacher": teacher_id, "settings": settings,
                           "prompts": [prompt_token_ids(tokenizer, prompt) for prompt in prompts]}, sort_keys=True)
    key = hashlib.sha256(material.encode()).hexdigest()[:16]
    folder = os.path.join(cache_dir or user_cache_dir("seqkd"), key)
    # One process at a time per set (a study's cells side by side ask for the same one): the second finds it done.
    # Ranks of one run share the work instead, so they take no lock (it would deadlock their barrier).
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    lock = FileLock(folder + ".lock") if state is None else contextlib.nullcontext()
    with lock:
        if not os.path.exists(os.path.join(folder, DONE)):
            _generate_missing_parts(teacher, tokenizer, prompts, settings, batch_size, folder, state, log)
            if state is None or state.is_main_process:
                _assemble(dataset, prompts, settings, teacher_id, folder)
            if state is not None:
                state.wait_for_everyone()
        elif state is None or state.is_main_process:
            log(f"[completions] reusing the teacher's completions in {folder}")
    generated = load_from_disk(os.path.join(folder, "dataset"))
    _refuse_mostly_empty(generated, folder)
    return generated, folder


def _refuse_mostly_empty(generated: Dataset, folder: str) -> None:
    """Stop before training when more than half of the teacher's completions are empty: the student would learn to
    end every answer at once (the loss on the end-of-sequence token alone)."""
    empty = sum(not completion_text(completion).strip() for completion in generated["completion"])
    if empty * 2 > len(generated):
        raise ValueError(
            f"Teacher completions: the teacher answered {empty} of {len(generated)} training prompts with nothing (it "
            "ended its answer at once), so the student would learn to say nothing. Usually an instruct teacher given "
            "plain prompts: use conversational data (prompt as chat messages, or messages) so that its chat template "
            f"is applied, or a prompt_template it answers. The completions are in {folder}.")


def _generate_missing_parts(teacher, tokenizer, prompts, settings, batch_size, folder, state, log) -> None:
    parts = os.path.join(folder, "parts")
    os.makedirs(parts, exist_ok=True)
    block = batch_size * BLOCK_BATCHES
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    generation = {k: v for k, v in settings.items() if k != "seed"}
    with _gathered(teacher):
        for index, start in enumerate(range(0, len(prompts), block)):
            path = os.path.join(parts, f"part-{index:05d}.jsonl")
            if index % world != rank or os.path.exists(path):
                continue
            if settings.get("do_sample"):
                torch.manual_seed(settings["seed"] + index)  # per block, so a resumed run samples the same
            completions = generate_predictions(teacher, tokenizer, prompts[start:start + block],
                                               batch_size=batch_size, strip=False, **generation)
            write_atomically(path, "".join(json.dumps({"completion": c}) + "\n" for c in completions))
            log(f"[completions] teacher completions {start + len(completions)}/{len(prompts)}")
    if state is not None:
        state.wait_for_everyone()


def _assemble(dataset, prompts, settings, teacher_id, folder) -> None:
    completions = []
    for name in sorted(os.listdir(os.path.join(folder, "parts"))):
        if name.endswith(".jsonl"):
            with open(os.path.join(folder, "parts", name)) as handle:
                completions += [json.loads(line)["completion"] for line in handle]
    if len(completions) != len(prompts):
        raise RuntimeError(f"{folder}: {len(completions)} completions for {len(prompts)} prompts; delete the folder "
                           "and run again.")
    rows = []
    for example, prompt, generated in zip(dataset, prompts, completions):
        row = {k: v for k, v in example.items() if k != "messages"}
        if is_conversational(prompt):
            row.update(prompt=prompt, completion=[{"role": "assistant", "content": generated.strip()}])
        else:
            row.update(prompt=prompt, completion=generated.rstrip())
        rows.append(row)
    staging = os.path.join(folder, "dataset.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    Dataset.from_list(rows).save_to_disk(staging)
    shutil.rmtree(os.path.join(folder, "dataset"), ignore_errors=True)
    os.replace(staging, os.path.join(folder, "dataset"))
    info = {"teacher": teacher_id, "settings": settings, "num_examples": len(rows)}
    write_atomically(os.path.join(folder, "generation.json"), json.dumps(info, indent=2))
    write_done(folder, info)
