"""A teacher cache on disk: what it holds, the key that says what it was made from, and reading it into training.

The folder:

    PATH/cache_info.json      the key and what it is made of; `complete: true` once every block is written; each
                              split's counts and its blocks' digests (the schema: `integrity.read_info`)
    PATH/cache_plan.json      the same key, written first: a pass that finds it resumes (or is refused if it differs)
    PATH/<split>/block-NNNNNN  a `datasets` folder (Arrow) per block of `BLOCK_ROWS` rows of the split, in row order:
                              `row_hash` (the row's tokens and labels), `teacher_tokens` (its label tokens n) and
                              `teacher_record` (the compressed sparse teacher, `format.py`), and `kd_block.json`,
                              its files' sizes and sha256, written with it
    PATH/.lock                the lock a pass holds while it writes (`writer.writing_lock`)

The key covers the teacher (name, adapter, a fingerprint of its weights and config), the tokenizer, the data (every
row's tokens and labels, in the trainer's order) and the settings (`mode`, `k`, vocabulary, format). Training reads the
cache only when the data and settings it would write now are the ones stored, row by row; otherwise it names what
differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass

import datasets
import numpy as np
import torch

from ..losses.sparse import SparseTargets
from .format import CODE_STEP, COMPRESSION_LEVEL, decode
from .integrity import CacheProblem, check_whole, read_info
from .layout import FORMAT_VERSION, block_name, digest


# Batch keys the collator adds (the trainers keep them away from the models), and the columns it reads.
BATCH_KEYS = ("teacher_ids", "teacher_log_probs", "teacher_tail_log_mass", "teacher_tail_log_mass_tempered",
              "teacher_label_log_probs")
LABEL_KEY = BATCH_KEYS[-1]  # only from a cache of the teacher's own tokenization
RECORD_COLUMNS = ("teacher_tokens", "teacher_record")


@contextlib.contextmanager
def quiet_datasets():
    """No `datasets` progress bars inside (saving and joining blocks is the cache's bookkeeping, not the user's)."""
    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not quiet:
            datasets.enable_progress_bars()


# Whose tokenization of each row a cache holds the teacher at: the student's (`input_ids`, `labels`: the teacher shares
# its vocabulary), or the teacher's own (`teacher_input_ids`, labels where `teacher_completion_mask` is 1: a teacher of
# another tokenizer, for the methods that align the two, `kd_trainers.losses.aligned`).
TOKENIZATIONS = {"student": "", "teacher": "teacher_"}


def row_tokens(example: dict, tokenization: str = "student") -> tuple[np.ndarray, np.ndarray]:
    """`(token ids [L], labels [L])` of a row in `tokenization` (`TOKENIZATIONS`), labels -100 off the loss."""
    if tokenization == "student":
        ids = np.asarray(example["input_ids"], dtype=np.int64)
        return ids, np.asarray(example.get("labels", example["input_ids"]), dtype=np.int64)
    ids = np.asarray(example["teacher_input_ids"], dtype=np.int64)
    return ids, np.where(np.asarray(example["teacher_completion_mask"]) == 1, ids, -100)


def row_hash(example: dict, tokenization: str = "student") -> str:
    """What a row is to the cache: its token ids and which of them are labels."""
    ids, labels = row_tokens(example, tokenization)
    return hashlib.sha256(ids.tobytes() + b"|" + labels.tobytes()).hexdigest()[:16]


def label_token_count(example: dict, tokenization: str = "student") -> int:
    """Label tokens of a row as the loss sees them: positions 1.. whose label is not -100 (shifted by one)."""
    return int((row_tokens(example, tokenization)[1][1:] != -100).sum())


def split_fingerprint(dataset, tokenization: str = "student") -> tuple[dict, list[str]]:
    """`({rows, fingerprint}, row hashes)` of a split, the hashes in row order."""
    hashes = [row_hash(example, tokenization) for example in dataset]
    return {"rows": len(hashes), "fingerprint": digest(hashes)}, hashes


def tokenizer_fingerprint(tokenizer) -> str:
    return digest([sorted(tokenizer.get_vocab().items()), getattr(tokenizer, "chat_template", None),
                    [getattr(tokenizer, name, None) for name in ("bos_token_id", "eos_token_id", "pad_token_id")]])


def teacher_fingerprint(teacher: torch.nn.Module) -> str:
    """The teacher's config and a sample of every weight tensor (its first and last values and a strided sample):
    cheap for any size, and changed by any training or another checkpoint."""
    parts = [teacher.config.to_json_string(use_diff=False)]
    with torch.no_grad():
        for name, param in teacher.state_dict().items():
            flat = param.detach().reshape(-1)
            sample = torch.cat([flat[:16], flat[-16:], flat[:: max(1, flat.numel() // 64)]]) if flat.numel() else flat
            parts.append(f"{name}|{tuple(param.shape)}|{param.dtype}|{sample.float().cpu().numpy().tobytes().hex()}")
    return digest(parts)


def teacher_files_fingerprint(teacher) -> str | None:
    """For a teacher named by a local folder: its files' names, sizes and modification times (cheap, without loading
    it), so that a teacher retrained in place is told from the one a cache was written by. None otherwise."""
    if not isinstance(teacher, str) or not os.path.isdir(teacher):
        return None
    entries = []
    for folder, _, files in os.walk(teacher):
        for file in sorted(files):
            stat = os.stat(os.path.join(folder, file))
            entries.append((os.path.relpath(os.path.join(folder, file), teacher), stat.st_size, stat.st_mtime_ns))
    return digest(sorted(entries))


@dataclass(frozen=True)
class CacheSettings:
    """What a pass writes: `mode` (top_k or sampled), `k` (ids a token), `vocab` (the distilled vocabulary), the
    `temperatures` at which the tail's mass is stored (`top_k`: what makes a tempered target exact; 1 first) and the
    `tokenization` whose label tokens it holds (`TOKENIZATIONS`; the teacher's own also stores each label token's
    log-probability)."""

    mode: str
    k: int
    vocab: int
    temperatures: tuple[float, ...] = (1.0,)
    tokenization: str = "student"

    @classmethod
    def for_run(cls, mode: str, k: int, vocab: int, temperature: float,
                more_temperatures: list[float] | None = None, tokenization: str = "student") -> "CacheSettings":
        """The settings a run writes: the tail at 1, at the run's temperature and at any other it names (a sampled
        cache needs none: its draws are reweighted)."""
        wanted = {1.0} if mode == "sampled" else {1.0, float(temperature), *map(float, more_temperatures or [])}
        return cls(mode, k, vocab, (1.0, *sorted(wanted - {1.0})), tokenization)

    @property
    def stores_labels(self) -> bool:
        return self.tokenization == "teacher"

    def as_dict(self) -> dict:
        settings = {"mode": self.mode, "k": self.k, "vocab": self.vocab, "format_version": FORMAT_VERSION,
                    "code_step": CODE_STEP, "zstd_level": COMPRESSION_LEVEL, "temperatures": list(self.temperatures)}
        if self.tokenization != "student":  # named only when it is not the first kind: older caches keep their key
            settings["tokenization"] = self.tokenization
        return settings


def cache_components(teacher: dict, tokenizer: str, data: dict, settings: CacheSettings) -> dict:
    return {"teacher": teacher, "tokenizer": tokenizer, "data": data, "settings": settings.as_dict()}


def read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def differences(stored: dict, wanted: dict, prefix: str = "") -> list[str]:
    """`a.b: stored X, now Y` for every leaf that differs between two component trees."""
    found = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}: stored {a!r}, now {b!r}")
    return found


class TeacherCache:
    """A complete cache, opened for reading (`TeacherCache.open`)."""

    def __init__(self, path: str, info: dict):
        self.path, self.info = path, info
        self.key = info["key"]
        settings = info["components"]["settings"]
        self.mode, self.k, self.vocab = settings["mode"], settings["k"], settings["vocab"]
        self.temperatures = tuple(settings.get("temperatures", [1.0]))
        self.tokenization = settings.get("tokenization", "student")
        self.id_bytes = info["id_bytes"]

    @classmethod
    def open(cls, path: str, whole: bool = False) -> "TeacherCache | None":
        """The complete cache at `path`, or None when there is none (or only a partial pass). An info file that
        breaks the schema raises `integrity.CacheProblem`, naming the field; `whole=True` also checks every block
        against its checksum (sha256 at about 1.7 GB/s) and returns None when one is damaged, for a pass to rewrite
        it."""
        info = read_info(path)
        if not info or not info["complete"]:
            return None
        if whole:
            try:
                check_whole(path, info)
            except CacheProblem:
                return None
        return cls(path, info)

    def describe(self) -> str:
        """What a model card and `run_info.json` say of the cache as the teacher."""
        teacher = self.info["components"]["teacher"]
        tokenization = "" if self.tokenization == "student" else "; at the teacher's own tokenization"
        return (f"teacher cache {os.path.abspath(self.path)} (key {self.key}; {self.mode}, k={self.k}{tokenization}; "
                f"teacher {teacher['name']}, weights {teacher['weights']})")

    def check(self, tokenizer: str, data: dict, settings: CacheSettings, teacher: dict | None) -> None:
        """Fail, naming each difference, unless the cache was written for this tokenizer, data and settings, and for
        the teacher a run names (`{name, adapter, files}`; None: the run names none and reads whatever wrote it)."""
        stored = dict(self.info["components"])
        # Temperatures are checked apart: a cache that stores more of them than a run asks for serves it.
        stored["settings"] = {k: v for k, v in stored["settings"].items() if k != "temperatures"}
        # A split the run does not have (no eval_dataset) is not read, so the rows stored for it do not bind it.
        stored["data"] = {split: rows for split, rows in stored["data"].items() if data.get(split) is not None}
        data = {split: rows for split, rows in data.items() if rows is not None}
        wanted = {"tokenizer": tokenizer, "data": data,
                  "settings": {k: v for k, v in settings.as_dict().items() if k != "temperatures"}}
        found = differences({key: stored[key] for key in wanted}, wanted)
        if teacher is not None:
            found += differences({key: stored["teacher"].get(key) for key in teacher}, teacher, "teacher.")
        if found:
            raise ValueError(
                f"teacher_cache={self.path!r} was written for other data or settings ({'; '.join(found)}), so it "
                "does not hold this run's teacher targets. Point teacher_cache at a new folder (it is written there "
                "first), or delete this one to rewrite it.")

    def tempered_index(self, temperature: float) -> int:
        """The row of the stored tails at `temperature`; fails, naming the stored temperatures, when it has none
        (a sampled cache serves any: its draws are reweighted)."""
        if self.mode == "sampled":
            return 0
        if float(temperature) not in self.temperatures:
            raise ValueError(
                f"teacher_cache={self.path!r} stores the teacher's tail at temperatures {list(self.temperatures)}, "
                f"not at temperature={temperature}, so its tempered targets would not be exact. Write a cache for this "
                "temperature (a new teacher_cache folder; teacher_cache_temperatures lists more to store at once), or "
                "train at a stored one.")
        return self.temperatures.index(float(temperature))

    def split(self, name: str) -> datasets.Dataset:
        """The stored rows of a split, in order (memory-mapped Arrow)."""
        blocks = self.info["splits"][name]["blocks"]
        return datasets.concatenate_datasets(
            [datasets.load_from_disk(os.path.join(self.path, name, block_name(index))) for index in range(blocks)])

    def attach(self, dataset: datasets.Dataset, name: str, hashes: list[str], suffix: str = "") -> datasets.Dataset:
        """`dataset` with the cache's columns beside it (`teacher_tokens{suffix}`, `teacher_record{suffix}`: one cache
        of several has its own suffix), after checking that each row is the one cached."""
        with quiet_datasets():
            stored = self.split(name)
        if len(stored) != len(dataset):
            raise ValueError(f"teacher_cache={self.path!r} holds {len(stored)} rows of the {name} split, the data has "
                             f"{len(dataset)}.")
        mismatched = [index for index, (a, b) in enumerate(zip(stored["row_hash"], hashes)) if a != b]
        if mismatched:
            raise ValueError(f"teacher_cache={self.path!r}: {len(mismatched)} rows of the {name} split differ from "
                             f"the cached ones (first: row {mismatched[0]}).")
        with quiet_datasets():
            if dataset._indices is not None:  # a shuffled or selected dataset: its rows in order, for the join
                dataset = dataset.flatten_indices()
            columns = stored.select_columns(list(RECORD_COLUMNS))
            if suffix:
                columns = columns.rename_columns({column: column + suffix for column in RECORD_COLUMNS})
            return datasets.concatenate_datasets([dataset, columns], axis=1)

    def bytes_per_token(self) -> float:
        splits = self.info["splits"].values()
        return sum(split["record_bytes"] for split in splits) / max(1, sum(split["label_tokens"] for split in splits))


class SparseTeacherCollator:
    """Wraps a trainer's collator: the cache's records of a batch's rows become `teacher_ids` `[N, k]`,
    `teacher_log_probs` `[N, k]`, `teacher_tail_log_mass` `[N]` and `teacher_tail_log_mass_tempered` `[N]` (the tail
    at the run's `temperature`), N the batch's label tokens in row-major order (each key with `suffix` for one cache
    of several)."""

    def __init__(self, collator, cache: TeacherCache, suffix: str = "", temperature: float = 1.0):
        self.collator, self.cache, self.suffix, self.temperature = collator, cache, suffix, temperature
        self.tempered_index = cache.tempered_index(temperature)

    def __call__(self, examples: list[dict]) -> dict:
        examples = [dict(example) for example in examples]
        tokens, record = (column + self.suffix for column in RECORD_COLUMNS)
        with_labels = self.cache.tokenization != "student"
        parts = [decode(example.pop(record), example.pop(tokens), self.cache.k, self.cache.id_bytes,
                        self.cache.mode, len(self.cache.temperatures), self.tempered_index, self.temperature,
                        with_labels)
                 for example in examples]
        batch = self.collator(examples)
        labels = batch[TOKENIZATIONS[self.cache.tokenization] + "labels"][:, 1:]
        count = int((labels != -100).sum())
        ids, log_probs, tail, tempered = (torch.cat(tensors) for tensors in
                                          zip(*((p.ids, p.log_probs, p.tail_log_mass, p.tempered_tail_log_mass)
                                                for p in parts)))
        label_log_probs = torch.cat([p.label_log_probs for p in parts]) if with_labels else None
        targets = SparseTargets(ids, log_probs, tail, self.cache.mode, tempered, self.temperature, label_log_probs)
        if targets.ids.size(0) != count:
            raise ValueError(f"teacher_cache={self.cache.path!r}: the batch has {count} label tokens but its cached "
                             f"rows hold {targets.ids.size(0)}; the collator labels other tokens than the cache pass "
                             "did (packing is not supported with a teacher cache).")
        batch.update(zip((key + self.suffix for key in BATCH_KEYS[:4]), (ids, log_probs, tail, tempered)))
        if with_labels:
            batch[LABEL_KEY + self.suffix] = label_log_probs
        return batch


def targets_from_batch(batch: dict, mode: str, suffix: str = "", temperature: float = 1.0) -> SparseTargets:
    """The batch's `SparseTargets` as `SparseTeacherCollator` put them in (the tail at `temperature` and, from a cache
    of the teacher's own tokenization, the label log-probabilities included)."""
    ids, log_probs, tail, tempered = (batch[key + suffix] for key in BATCH_KEYS[:4])
    return SparseTargets(ids, log_probs, tail, mode, tempered, temperature, batch.get(LABEL_KEY + suffix))
