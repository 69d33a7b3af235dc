"""The cache pass: a teacher over a trainer's own tokenized splits, its sparse distribution at every label token
written to disk block by block.

Blocks are `BLOCK_ROWS` rows of a split, in row order; with several processes, block j is written by process
j mod world_size, each into its own folder through a temporary name and a rename, so an interrupted pass (or one
restarted with another number of processes) writes only the blocks that are missing. Each block carries its checksum
(`integrity.py`); a block that no longer matches it (truncated, edited, half-deleted) is written again, so a pass over
a damaged cache rewrites only the damaged blocks. The main process writes `cache_info.json` last, once every block is
there and whole.

One pass writes a folder at a time: a second pass into the same folder (another `kd-train cache-teacher`) waits for
the first's lock, says so once, and then finds the cache written.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import math
import os
import shutil
import time
import zlib

import datasets
import torch

from ..runtime.files import write_atomically
from ..models.hidden_states import last_hidden_state
from ..losses.heads import weight_and_bias
from ..losses.settings import LogitTransform
from ..losses.noise import mix_seed
from ..losses.sparse import sampled_targets, tail_log_masses, top_k_targets
from .cache import (CacheSettings, TeacherCache, differences, label_token_count, quiet_datasets, read_json,
                    row_tokens)
from .format import encode, id_bytes_for, raw_size
from .integrity import CacheProblem, block_problem, read_block_checksum, write_block_checksum
from .layout import BLOCK_ROWS, INFO, PLAN, block_name, cache_key, digest

LOCK = ".lock"
# Windows has no advisory locks: two passes into one folder there still end with one whole cache (a block published
# twice keeps the first copy), only without the wait.
fcntl = importlib.import_module("fcntl") if importlib.util.find_spec("fcntl") else None


# Rows of `[rows, V]` fp32 logits projected at once: 64 MiB at a 131k vocabulary.
PROJECTION_BUDGET_BYTES = 64 * 2**20


def right_padded(examples: list[dict], pad_id: int, device, tokenization: str = "student"
                 ) -> tuple[dict, torch.Tensor]:
    """Right-padded `input_ids`/`attention_mask` and `labels` `[B, L]` of a list of rows, in `tokenization`."""
    tokens = [row_tokens(example, tokenization) for example in examples]
    length = max(len(ids) for ids, _ in tokens)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (row_ids, row_labels) in enumerate(tokens):
        n = len(row_ids)
        ids[row, :n] = torch.as_tensor(row_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.as_tensor(row_labels)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, labels.to(device)


@torch.no_grad()
def sparse_rows(teacher, hidden: torch.Tensor, settings: CacheSettings, transform: LogitTransform,
                generator: torch.Generator | None = None, labels: torch.Tensor | None = None):
    """`(ids [n, k], log_probs [n, k], tail log-masses [m, n], label log-probabilities [n] or None)` of the teacher at
    hidden states `[n, D]`, the tails at each of `settings.temperatures` (1 first), the label `labels` `[n]`'s
    log-probability at temperature 1 when they are given."""
    weight, bias = weight_and_bias(teacher.get_output_embeddings())
    rows = max(1, PROJECTION_BUDGET_BYTES // (4 * settings.vocab))
    parts = []
    for start in range(0, hidden.size(0), rows):
        logits = hidden[start: start + rows] @ weight[: settings.vocab].T
        if bias is not None:
            logits = logits + bias[: settings.vocab]
        logits = transform(logits.float())
        targets = top_k_targets(logits, settings.k) if settings.mode == "top_k" else \
            sampled_targets(logits, settings.k, generator)
        tails = [targets.tail_log_mass, *tail_log_masses(logits, targets.ids, settings.temperatures[1:])]
        label = None if labels is None else \
            logits.log_softmax(-1).gather(1, labels[start: start + rows, None])[:, 0]
        parts.append((targets.ids, targets.log_probs, torch.stack(tails), label))
    if not parts:
        empty = hidden.new_zeros(0, settings.k)
        return (empty.long(), empty.float(), hidden.new_zeros(len(settings.temperatures), 0).float(),
                None if labels is None else hidden.new_zeros(0).float())
    ids, log_probs, tails, label = zip(*parts)
    return (torch.cat(ids), torch.cat(log_probs), torch.cat(tails, dim=1),
            None if labels is None else torch.cat(label))


def _write_block(teacher, dataset, split: str, index: int, settings: CacheSettings, transform: LogitTransform,
                 pad_id: int, batch_size: int, seed: int, hashes: list[str], folder: str, id_bytes: int) -> None:
    device = next(teacher.parameters()).device
    rows = range(index * BLOCK_ROWS, min((index + 1) * BLOCK_ROWS, len(dataset)))
    columns = {"row_hash": [], "teacher_tokens": [], "teacher_record": []}
    for start in range(rows.start, rows.stop, batch_size):
        examples = [dataset[row] for row in range(start, min(start + batch_size, rows.stop))]
        inputs, labels = right_padded(examples, pad_id, device, settings.tokenization)
        hidden = last_hidden_state(teacher, inputs)[:, :-1]
        for offset, example in enumerate(examples):
            positions = labels[offset, 1:] != -100
            generator = None
            if settings.mode == "sampled":  # each row's draws from its own seed: the same whoever writes it
                generator = torch.Generator(device=device).manual_seed(
                    mix_seed(seed, zlib.crc32(split.encode()), start + offset))
            ids, log_probs, tail, label_log_probs = sparse_rows(
                teacher, hidden[offset][positions], settings, transform, generator,
                labels[offset, 1:][positions] if settings.stores_labels else None)
            columns["row_hash"].append(hashes[start + offset])
            columns["teacher_tokens"].append(label_token_count(example, settings.tokenization))
            columns["teacher_record"].append(encode(ids, log_probs, tail, id_bytes, label_log_probs))
    block = datasets.Dataset.from_dict(columns, features=datasets.Features({
        "row_hash": datasets.Value("string"), "teacher_tokens": datasets.Value("int32"),
        "teacher_record": datasets.Value("binary")}))
    final = os.path.join(folder, split, block_name(index))
    temporary = final + f".tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    with quiet_datasets():
        block.save_to_disk(temporary)
    write_block_checksum(temporary, len(block), sum(columns["teacher_tokens"]),
                         sum(len(record) for record in columns["teacher_record"]))
    shutil.rmtree(final, ignore_errors=True)  # a damaged block, set aside only now that its replacement is whole
    try:
        os.replace(temporary, final)
    except OSError:  # another writer published the same block first: its copy is the same rows' same records
        shutil.rmtree(temporary, ignore_errors=True)
        if block_problem(final) is not None:
            raise


@contextlib.contextmanager
def writing_lock(path: str, log=print):
    """The folder's write lock (`PATH/.lock`, an advisory lock the system frees if the process dies), held by one
    pass at a time; a second one says once that it waits, and waits."""
    os.makedirs(path, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(os.path.join(path, LOCK), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"teacher cache: {path} is being written by another process; waiting for it to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _clear_leftovers(path: str, splits) -> None:
    """Temporary block folders of a pass that was killed (this pass holds the lock: no other is writing them)."""
    for split in splits:
        folder = os.path.join(path, split)
        for name in os.listdir(folder):
            if ".tmp-" in name:
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def write_teacher_cache(path: str, teacher, splits: dict, hashes: dict[str, list[str]], components: dict,
                        settings: CacheSettings, pad_id: int, accelerator, batch_size: int = 8, seed: int = 0,
                        log=print) -> TeacherCache:
    """Write (or finish) the cache of `teacher` over `splits` (`{name: tokenized dataset}`) at `path`, on every
    process of `accelerator`, and return it opened. `components` is the key's content (`cache_components`)."""
    key = cache_key(components)
    lock = writing_lock(path, log) if accelerator.is_main_process else contextlib.nullcontext()
    with lock:
        return _write(path, teacher, splits, hashes, components, settings, pad_id, accelerator, batch_size, seed, log,
                      key)


def _write(path, teacher, splits, hashes, components, settings, pad_id, accelerator, batch_size, seed, log, key):
    try:
        existing = read_json(os.path.join(path, PLAN))
    except ValueError as error:
        raise CacheProblem(f"teacher_cache={path!r}: {PLAN} cannot be read ({error}), so the blocks there cannot be "
                           "told apart from another teacher's; delete the folder to rewrite the cache.") from None
    if existing is not None and existing.get("key") != key:
        raise ValueError(
            f"teacher_cache={path!r} holds a cache (or a partial pass) of another teacher, data or settings "
            f"({'; '.join(differences(existing['components'], components))}). Point teacher_cache at a new folder, "
            "or delete this one to rewrite it.")
    accelerator.wait_for_everyone()  # every process has read the plan before the main one may write it
    try:
        done = TeacherCache.open(path, whole=True)  # a pass this one waited for may have written it all
    except CacheProblem:
        done = None  # an info file that cannot be trusted: rewritten from the plan and the blocks
    if done is not None and done.key == key:
        accelerator.wait_for_everyone()
        return done
    if accelerator.is_main_process:
        for split in splits:
            os.makedirs(os.path.join(path, split), exist_ok=True)
        _clear_leftovers(path, splits)
        if os.path.exists(os.path.join(path, INFO)):  # a cache being repaired is partial until its info is rewritten
            os.remove(os.path.join(path, INFO))
        if existing is None:
            write_atomically(os.path.join(path, PLAN), json.dumps({"key": key, "components": components}, indent=2))
    accelerator.wait_for_everyone()
    id_bytes = id_bytes_for(settings.vocab)
    transform = LogitTransform.from_config(teacher.config)
    started, written = time.perf_counter(), 0
    for split, dataset in splits.items():
        blocks = math.ceil(len(dataset) / BLOCK_ROWS)
        for index in range(accelerator.process_index, blocks, accelerator.num_processes):
            problem = block_problem(os.path.join(path, split, block_name(index)))
            if problem is None:
                continue  # written by an earlier pass, and whole
            if problem != "is missing":
                log(f"teacher cache: {split}/{block_name(index)} {problem}: writing it again")
            _write_block(teacher, dataset, split, index, settings, transform, pad_id, batch_size, seed,
                         hashes[split], path, id_bytes)
            written += 1
            if accelerator.is_main_process:
                log(f"teacher cache: {split} block {index + 1}/{blocks} written")
    if accelerator.num_processes > 1:
        log(f"teacher cache: process {accelerator.process_index}/{accelerator.num_processes} wrote {written} blocks")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        info = {"key": key, "components": components, "complete": True, "id_bytes": id_bytes, "splits": {}}
        for split, dataset in splits.items():
            blocks = math.ceil(len(dataset) / BLOCK_ROWS)
            entries = [read_block_checksum(os.path.join(path, split, block_name(index))) for index in range(blocks)]
            missing = [index for index, entry in enumerate(entries) if entry is None]
            if missing:
                raise RuntimeError(f"teacher cache {path}: blocks {missing} of {split} are missing after the pass.")
            tokens = sum(entry["label_tokens"] for entry in entries)
            info["splits"][split] = {"rows": sum(entry["rows"] for entry in entries), "blocks": blocks,
                                     "label_tokens": tokens,
                                     "record_bytes": sum(entry["record_bytes"] for entry in entries),
                                     "raw_bytes": raw_size(tokens, settings.k, id_bytes, len(settings.temperatures),
                                                          settings.stores_labels),
                                     "block_digests": [digest(entry) for entry in entries]}
        write_atomically(os.path.join(path, INFO), json.dumps(info, indent=2))
        cache = TeacherCache(path, info)
        log(f"teacher cache complete: {path} (key {key}; {cache.bytes_per_token():.1f} bytes a label token; "
            f"{written} blocks written here in {time.perf_counter() - started:.0f}s)")
    accelerator.wait_for_everyone()
    return TeacherCache.open(path)
