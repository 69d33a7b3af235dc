"""A teacher read from a cache on disk (`teacher_cache`): its sparse distribution at every label token, written once by
the teacher (here, first, when the cache is not complete and the run names its teacher) and joined to the trainer's
tokenized data row by row; the collator turns each batch's records into sparse targets. The cache's format, key and
integrity are `kd_trainers.teacher_cache`."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field

import torch

from ..losses import SparseMember
from ..losses.sparse import check_sparse_settings
from ..teacher_cache import (BATCH_KEYS, CacheSettings, SparseTeacherCollator, TeacherCache, cache_components,
                             split_fingerprint, targets_from_batch, teacher_files_fingerprint, teacher_fingerprint,
                             tokenizer_fingerprint, write_teacher_cache)
from ..teacher_cache.cache import RECORD_COLUMNS
from ..teacher_cache.integrity import CacheProblem, check_whole, has_partial_pass, read_info
from ..teacher_cache.integrity import fix as integrity_fix
from .base import Teacher, TeacherDescription, register_teacher_kind
from .loading import freeze, model_name
from .needs import stand_in_tokenization
from .resident import checked_heads


@dataclass
class TeacherCacheFields:
    """The config fields of a teacher cache (documented on `KDConfig`), for the configs of the methods that can read
    one, with their checks."""

    teacher_cache: str | None = field(
        default=None,
        metadata={"help": "Folder of the teacher's cached sparse distributions, read in place of a teacher in memory "
                  "(written there first by the teacher when it holds no complete cache)."},
    )
    teacher_cache_mode: str = field(
        default="top_k", metadata={"help": "What the cache stores per token: top_k or sampled.",
                                   "choices": ["top_k", "sampled"]})
    teacher_cache_k: int = field(default=32, metadata={"help": "Ids stored per label token (top-k, or draws)."})
    teacher_cache_tail: str = field(
        default="bucket", metadata={"help": "A top_k target's tail: bucket (one category) or spread (evenly).",
                                    "choices": ["bucket", "spread"]})
    teacher_cache_batch_size: int = field(default=8, metadata={"help": "Rows per teacher forward in the cache pass."})
    teacher_cache_temperatures: list[float] | None = field(
        default=None, metadata={"help": "More temperatures (besides 1 and kd_temperature) at which a top_k cache "
                                "stores the tail's mass, for exact tempered targets."})

    def _check_teacher_cache_settings(self) -> None:
        if self.teacher_cache_mode not in ("top_k", "sampled"):
            raise ValueError(f"teacher_cache_mode must be 'top_k' or 'sampled', got {self.teacher_cache_mode!r}.")
        self._check_positive_integers("teacher_cache_k", "teacher_cache_batch_size")
        if self.teacher_cache is None:
            return
        check_sparse_settings(self.teacher_cache_mode, self.teacher_cache_tail, self.divergence)
        temperatures = self.teacher_cache_temperatures
        if temperatures is not None and (not isinstance(temperatures, (list, tuple)) or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t < float("inf")
                for t in temperatures)):
            raise ValueError(f"teacher_cache_temperatures must be a list of temperatures > 0, got {temperatures!r}.")
        if getattr(self, "packing", False):
            raise ValueError(f"packing=True with teacher_cache={self.teacher_cache!r}: a packed row mixes examples "
                             "whose cached targets were written one example at a time. Set packing=False (or "
                             "padding_free=True, which a cache supports).")


def cache_splits(host) -> dict:
    """`{name: tokenized dataset}` the loss reads: `train`, and `eval` (or `eval_<name>` for a dict of them)."""
    splits = {"train": host.train_dataset}
    if isinstance(host.eval_dataset, dict):
        splits.update({f"eval_{name}": dataset for name, dataset in host.eval_dataset.items()})
    elif host.eval_dataset is not None:
        splits["eval"] = host.eval_dataset
    return splits


def split_fingerprints(host, tokenization: str = "student") -> tuple[dict, dict]:
    """`({split: {rows, fingerprint}}, {split: row hashes})` of the splits a cache is keyed to, in `tokenization`."""
    data, hashes = {}, {}
    for name, dataset in cache_splits(host).items():
        data[name], hashes[name] = split_fingerprint(dataset, tokenization)
    return data, hashes


def attach_cache(host, cache: TeacherCache, hashes: dict, suffix: str = "") -> None:
    """The cache's records joined to the host's train and eval splits, row by row."""
    attached = {name: cache.attach(dataset, name, hashes[name], suffix) for name, dataset in cache_splits(host).items()}
    host.train_dataset = attached.pop("train")
    if isinstance(host.eval_dataset, dict):
        host.eval_dataset = {name[len("eval_"):]: dataset for name, dataset in attached.items()}
    elif host.eval_dataset is not None:
        host.eval_dataset = attached["eval"]


# What follows "<where> holds no complete teacher cache" when nothing can write it, said for each entry point.
NO_WRITER = (", and no teacher is given to write it: set teacher_model_name_or_path (the cache is written there "
             "first), or run `kd-train cache-teacher RECIPE` with the teacher.")
NO_WRITER_IN_RECIPE = ", and teacher_model_name_or_path is null, so nothing can write it. Name the teacher (the " \
    "cache is written first), or run kd-train cache-teacher with it."
MEMBER_NOT_WRITTEN = ": write it first (kd-train cache-teacher RECIPE teacher_cache=PATH with that teacher)."


def complete_cache_info(path: str, where: str, then: str | None) -> dict | None:
    """The one completeness check of a cache, for the trainers and the recipes' checks: `cache_info.json` of the
    complete cache at `path` (its schema checked: a broken field raises `CacheProblem`, naming it). When it is not
    complete: None if a named teacher writes it first (`then` None), else a `ValueError` `<where> holds no complete
    teacher cache<then>` (or "holds an unfinished pass")."""
    info = read_info(path)
    if info is not None and info["complete"]:
        return info
    if then is None:
        return None
    what = "holds an unfinished pass" if info is not None or has_partial_pass(path) else \
        "holds no complete teacher cache"
    raise ValueError(f"{where} {what}{then}")


def check_cache_before_loading(path: str, field: str, *, writer_named: bool, no_writer: str, repair: bool = False,
                               settings: dict | None = None, tokenizer=None, student_name: str = "the student",
                               rows=None) -> None:
    """What a run will ask of the cache at `path` (its `field`: `teacher_cache`, or a teacher's `teachers[i].cache`),
    checked before anything loads (a recipe's checks): complete, unless a named teacher writes it first
    (`writer_named`; else the error ends with `no_writer`); written with the run's `settings` (`{mode, k,
    temperature, tokenization}`; None for a teacher among several, read as it was written); for the student's
    `tokenizer` (None: not known yet; not read for a cache of the teacher's own tokenization, whose tokenizer the
    trainer checks) and the data's rows (`rows()` -> `{split: count or None}`, None: not known before loading); every
    block whole, unless `repair` (the pass that rewrites what is damaged comes next). Raises `CacheProblem` or
    `ValueError` naming the field."""
    where = f"{field}: {path!r}"
    prefix = "" if field == "teacher_cache" else f"{field}: "  # a cache's own problem names teacher_cache=PATH
    try:
        info = complete_cache_info(path, where, None if writer_named else no_writer)
    except CacheProblem as error:
        if repair and writer_named:
            return
        raise CacheProblem(f"{prefix}{error}") from None
    if info is None:  # the named teacher writes it first
        return
    stored_tokenization = info["components"]["settings"].get("tokenization", "student")
    if settings is not None:
        stored = info["components"]["settings"]
        differ = [f"teacher_cache_{key}: {settings[key]!r} where the cache has {stored[key]!r}" for key in ("mode", "k")
                  if stored.get(key) != settings[key]]
        if stored_tokenization != settings.get("tokenization", "student"):
            differ.append(f"the method reads the teacher at the {settings.get('tokenization', 'student')}'s "
                          f"tokenization, the cache holds it at the {stored_tokenization}'s")
        if settings["mode"] == "top_k" and float(settings["temperature"]) not in stored["temperatures"]:
            differ.append(f"kd_temperature: {settings['temperature']!r} where the cache stores the tail at "
                          f"temperatures {stored['temperatures']}")
        if differ:
            raise ValueError(f"{where} was written with other settings ({'; '.join(differ)}); point teacher_cache "
                             "at a new folder or match its settings.")
    if tokenizer is not None and stored_tokenization == "student" and \
            tokenizer_fingerprint(tokenizer) != info["components"]["tokenizer"]:
        raise ValueError(f"{where} was written for another tokenizer than the student's ({student_name}); point it "
                         "at a cache written for this student, or a new folder.")
    for split, count in (rows() if rows is not None else {}).items():
        stored = info["splits"].get(split, {}).get("rows")
        if count is not None and stored != count:
            raise ValueError(f"{where} holds {stored} rows of the {split} split, and the recipe's data has {count}: "
                             f"it was written for other data. Point {field} at a new folder (or one written for this "
                             "data).")
    if not repair:
        try:
            check_whole(path, info)
        except CacheProblem as error:
            raise CacheProblem(f"{prefix}{error}") from None


def open_complete(path: str, where: str, then: str = MEMBER_NOT_WRITTEN) -> TeacherCache:
    """The complete, whole cache at `path`, else an error naming `where` and the pass that writes or mends it (a
    teacher among several, and a run that names no teacher, cannot write one)."""
    cache = TeacherCache(path, complete_cache_info(path, where, then))
    check_whole(cache.path, cache.info)  # a damaged block: named, with the pass that rewrites it
    return cache


@register_teacher_kind
class CachedTeacher(Teacher):
    """The teacher's stored sparse targets. `member`: its name among several teachers (read only; its batch keys and
    columns carry the suffix `_<index>`), else the trainer's one teacher (written first when need be, by `source`)."""

    kind = "cache"
    # `split_fingerprints` of the trainer's data when a mixture has computed them already (every cache of several
    # teachers is keyed to the same rows: hashed once).
    fingerprints: tuple[dict, dict] | None = None

    def __init__(self, path: str, source, tokenizer, name, assumes_student_tokenizer=False, *, tail: str,
                 cache: TeacherCache | None = None, member: str | None = None, suffix: str = ""):
        super().__init__(source, tokenizer, name, assumes_student_tokenizer)
        self.path, self.tail, self.cache, self.member, self.suffix = path, tail, cache, member, suffix
        if suffix:
            self.batch_keys = tuple(key + suffix for key in BATCH_KEYS)
            self.columns = tuple(column + suffix for column in RECORD_COLUMNS)
        else:  # the trainer keeps the unsuffixed keys away from the models already
            self.columns = RECORD_COLUMNS

    @classmethod
    def chosen_by(cls, args, entries) -> bool:
        return not entries and getattr(args, "teacher_cache", None) is not None

    @classmethod
    def plan(cls, host, model, args, teacher_model, teacher_processing_class, student_tokenizer, entries=None):
        teacher = host._required_teacher(teacher_model, args)
        if teacher is None:  # a complete cache, written with the student's tokenizer (checked when it is read)
            complete_cache_info(args.teacher_cache, f"teacher_cache={args.teacher_cache!r}", NO_WRITER)
            if stand_in_tokenization(args) == "student":
                return cls(args.teacher_cache, None, student_tokenizer, None, True, tail=args.teacher_cache_tail)
            # at the teacher's own tokenization: its tokenizer, as the run names it, tokenizes the data a second time
            if teacher_processing_class is None and getattr(args, "teacher_tokenizer_name_or_path", None) is None:
                raise ValueError(
                    f"teacher_cache={args.teacher_cache!r} with {host._name} and no teacher model: the cache holds the "
                    "teacher at its own tokenization, and nothing names the teacher's tokenizer to tokenize each "
                    "example a second time. Set teacher_tokenizer_name_or_path (or pass teacher_processing_class).")
            tokenizer, assumed = host._checked_teacher_tokenizer(model, args, None, teacher_processing_class,
                                                                 student_tokenizer)
            return cls(args.teacher_cache, None, tokenizer, None, assumed, tail=args.teacher_cache_tail)
        # A teacher named to write it: checked as a teacher in memory is, before anything loads.
        tokenizer, assumed = host._checked_teacher_tokenizer(model, args, teacher, teacher_processing_class,
                                                             student_tokenizer)
        return cls(args.teacher_cache, teacher, tokenizer, model_name(teacher), assumed, tail=args.teacher_cache_tail)

    @classmethod
    def member_of(cls, entry, index: int, args, student_tokenizer) -> "CachedTeacher":
        """One of several teachers (`teacher_models[index]`): a complete cache, opened and checked whole now."""
        cache = open_complete(entry.source, f"teacher_models[{index}] ({entry.name}): cache={entry.source!r}")
        return cls(entry.source, None, student_tokenizer, None, tail=args.teacher_cache_tail, cache=cache,
                   member=entry.name, suffix=f"_{index}")

    def set_up(self, host, args) -> None:
        """The cache checked against the trainer's own tokenized data (written first by the named teacher when it is
        not complete), and joined to it: each row carries its teacher record, which the collator turns into the
        batch's sparse targets."""
        # Whose tokenization the cache holds: the student's (one vocabulary), or the teacher's own, for a method that
        # aligns the two tokenizations (ULD, GOLD), read at the teacher's label tokens.
        self.tokenization = tokenization = stand_in_tokenization(args) if self.member is None else "student"
        tokenizer = host.processing_class if tokenization == "student" else self.tokenizer
        data, hashes = self.fingerprints or split_fingerprints(host, tokenization)
        vocab = len(tokenizer)
        self.pad_id = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
        tokenizer = tokenizer_fingerprint(tokenizer)
        if self.member is not None:
            cache = self.cache
            cache.check(tokenizer, data, CacheSettings(cache.mode, cache.k, vocab), None)
        else:
            cache = self._written(host, args, data, hashes, tokenizer, vocab)
        cache.tempered_index(args.kd_temperature)  # a temperature the cache does not store: refused now
        attach_cache(host, cache, hashes, self.suffix)
        host.data_collator = SparseTeacherCollator(host.data_collator, cache, self.suffix, args.kd_temperature)
        self.cache, self.temperature = cache, args.kd_temperature
        if self.member is None:
            self.name = host.teacher_name = cache.describe()

    def _written(self, host, args, data: dict, hashes: dict, tokenizer: str, vocab: int) -> TeacherCache:
        """The trainer's one cache: opened whole, else written (or mended) by the named teacher, and checked against
        this run's tokenizer, data, settings and teacher."""
        settings = CacheSettings.for_run(args.teacher_cache_mode, args.teacher_cache_k, vocab, args.kd_temperature,
                                         args.teacher_cache_temperatures, self.tokenization)
        try:
            info = complete_cache_info(self.path, f"teacher_cache={self.path!r}", None)  # None: not complete yet
            cache = None if info is None else TeacherCache(self.path, info)
            if cache is not None:
                check_whole(cache.path, cache.info)
        except CacheProblem:
            if self.source is None:  # nothing here can rewrite it: the problem, with its fix
                raise
            cache = None  # the pass below rewrites what is damaged
        if cache is None and self.source is None:
            raise CacheProblem(f"teacher_cache={self.path!r} holds no complete, whole teacher cache, and no teacher "
                               f"is named to write it; {integrity_fix(self.path)}.")
        named = None if self.source is None else {  # what a run that names its teacher can check without loading it
            "name": model_name(self.source), "adapter": args.teacher_adapter_name_or_path,
            "files": teacher_files_fingerprint(self.source)}
        if cache is None:
            cache = self._write(host, args, data, hashes, tokenizer, settings, named)
        cache.check(tokenizer, data, settings, named)
        return cache

    def _write(self, host, args, data, hashes, tokenizer, settings, named) -> TeacherCache:
        teacher = checked_heads(host, freeze(host._load_teacher_model(self.source, args)), self.tokenizer,
                                self.assumes_student_tokenizer, args)
        if any(hasattr(param, "ds_id") for param in teacher.parameters()):
            raise ValueError(
                f"teacher_cache={self.path!r} is written by the teacher whole on each process, and DeepSpeed ZeRO-3 "
                "has partitioned it. Write the cache first without ZeRO-3 (kd-train cache-teacher RECIPE "
                "accelerate.config=multi_process), then train from it under ZeRO-3.")
        teacher.to(host.accelerator.device)
        components = cache_components({**named, "weights": teacher_fingerprint(teacher)}, tokenizer, data, settings)
        cache = write_teacher_cache(
            self.path, teacher, cache_splits(host), hashes, components, settings, self.pad_id, host.accelerator,
            batch_size=args.teacher_cache_batch_size, seed=args.seed, log=lambda message: print(message, flush=True))
        del teacher
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return cache

    def engine_source(self, host, inputs: dict, model_inputs: dict) -> SparseMember:
        return SparseMember(targets_from_batch(inputs, self.cache.mode, self.suffix, self.temperature), self.tail)

    def describe(self) -> TeacherDescription:
        cache = self.cache
        card = {"teacher_cache_key": cache.key, "teacher_cache_mode": cache.mode, "teacher_cache_k": cache.k,
                "teacher_cache_tail": self.tail if cache.mode == "top_k" else None,
                "teacher_cache_bytes_per_token": round(cache.bytes_per_token(), 1)}
        run_info = {"teacher_cache": {
            "path": os.path.abspath(cache.path), "key": cache.key, **cache.info["components"]["settings"],
            "teacher": cache.info["components"]["teacher"], "bytes_per_token": round(cache.bytes_per_token(), 2)}}
        return TeacherDescription(card, run_info)
