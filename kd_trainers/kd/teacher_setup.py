"""The one teacher set-up of every trainer with a teacher (KD, DSKD, Seq-KD, GKD), in two calls around the parent
trainer's `__init__`:

    plan = self._plan_teacher(model, args, teacher_model, teacher_processing_class, student_tokenizer)
        # before: the teacher's tokenizer, the vocabulary check, the head-size check of an in-memory student;
        # cheap, so that a mismatch fails before the dataset is tokenized or a model loaded
    super().__init__(...)                      # SFTTrainer: the student, its data, accelerate / DeepSpeed
    teacher = self._set_up_teacher(plan, args)
        # after: load (adapter merged), freeze, the head checks against the loaded student, the method's trainable
        # modules (DSKD's projectors), and accelerate / DeepSpeed preparation into `self.teacher_model`

A method changes a step through the hooks below, not by writing the set-up again.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl.models import prepare_deepspeed

from ..served_teacher import ServedTeacherCollator, TeacherClient
from ..teacher import (check_same_head_size, check_same_vocabulary, freeze, load_teacher, load_teacher_tokenizer,
                       model_name, output_head_shape)
from ..teacher_cache import (CacheSettings, SparseTeacherCollator, TeacherCache, cache_components, split_fingerprint,
                             teacher_files_fingerprint, teacher_fingerprint, tokenizer_fingerprint, write_teacher_cache)
from ..teacher_cache.integrity import CacheProblem, check_whole
from ..teacher_cache.integrity import fix as integrity_fix


@dataclass(frozen=True)
class TeacherPlan:
    """What `_plan_teacher` decided before the parent trainer exists."""

    teacher: str | PreTrainedModel | None  # as given: a name or path, or a model; None: a complete teacher cache
    tokenizer: PreTrainedTokenizerBase
    assumes_student_tokenizer: bool  # the teacher came without a tokenizer and the student's is used for it
    client: TeacherClient | None = None  # a served teacher (`teacher_url`)
    members: list | None = None  # several teachers (`teacher_models`): `several_teachers_setup.PlannedMember`s


class TeacherSetupMixin:
    """`_plan_teacher` and `_set_up_teacher` (see the module docstring), and the hooks a method may override."""

    @classmethod
    def _required_teacher(cls, teacher_model, args):
        """The teacher given, else the config's name for it; a clear error when there is neither."""
        teacher = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if getattr(args, "teacher_url", None) is not None:
            return teacher  # None too: the server is the teacher
        cache = getattr(args, "teacher_cache", None)
        if teacher is None and cache is not None:
            if TeacherCache.open(cache) is None:
                raise ValueError(
                    f"teacher_cache={cache!r} holds no complete teacher cache, and no teacher is given to write it: "
                    f"set teacher_model_name_or_path (the cache is written there first), or run `kd-train "
                    "cache-teacher RECIPE` with the teacher.")
            return None
        if teacher is None:
            raise ValueError(f"{cls.__name__} needs a teacher: pass teacher_model=<model or name> or set "
                             f"{type(args).__name__}.teacher_model_name_or_path.")
        return teacher

    def _plan_teacher(self, model, args, teacher_model, teacher_processing_class,
                      student_tokenizer: PreTrainedTokenizerBase) -> TeacherPlan:
        """Before the parent `__init__`: sets `teacher_processing_class` and `teacher_name`; loads no model."""
        entries = getattr(self, "_teacher_entries", None)
        if getattr(args, "teacher_column", None) is not None and not entries:
            raise ValueError(f"teacher_column={args.teacher_column!r} routes examples among several teachers, and "
                             f"{type(self).__name__} has one: pass teacher_models=[...] (a recipe's teachers:), or "
                             "drop teacher_column.")
        if entries:
            return self._plan_teachers(model, args, teacher_model, entries, student_tokenizer)
        teacher = self._required_teacher(teacher_model, args)
        if getattr(args, "teacher_url", None) is not None:
            return self._plan_served_teacher(args, teacher, teacher_processing_class, student_tokenizer, model)
        if teacher is None:  # a complete cache, written with the student's tokenizer (checked when it is read)
            self.teacher_processing_class, self.teacher_name = student_tokenizer, None
            return TeacherPlan(None, student_tokenizer, True)
        tokenizer, assumed = self._checked_teacher_tokenizer(model, args, teacher, teacher_processing_class,
                                                             student_tokenizer)
        self.teacher_processing_class = tokenizer
        self.teacher_name = model_name(teacher)
        return TeacherPlan(teacher, tokenizer, assumed)

    def _checked_teacher_tokenizer(self, model, args, teacher, teacher_processing_class,
                                   student_tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedTokenizerBase, bool]:
        """`(the teacher's tokenizer, whether the student's was assumed for it)`, checked against the student's; an
        assumed tokenizer also needs the two heads of one size (checked here for a student in memory)."""
        tokenizer = self._load_teacher_tokenizer(teacher, teacher_processing_class, args, student_tokenizer)
        # `load_teacher_tokenizer` returns the student's own object only when it assumed it.
        assumed = teacher_processing_class is None and tokenizer is student_tokenizer
        if assumed and self._compares_logits(args) and not isinstance(model, str):
            check_same_head_size(model, teacher)  # else checked in `_set_up_teacher`, once the student is loaded
        self._check_tokenizers(args, student_tokenizer, tokenizer, model_name(model), model_name(teacher))
        return tokenizer, assumed

    def _plan_served_teacher(self, args, teacher, teacher_processing_class, student_tokenizer,
                             model) -> TeacherPlan:
        """A teacher behind `args.teacher_url` (`_served_teacher`)."""
        args.check_served_temperature(f"teacher_url={args.teacher_url!r}", len(student_tokenizer))
        client, tokenizer, served = self._served_teacher(args, args.teacher_url, teacher, teacher_processing_class,
                                                          student_tokenizer, model)
        self.teacher_processing_class = tokenizer
        self.teacher_name = f"served at {client.public_url} (model {served['id']})"
        return TeacherPlan(teacher, tokenizer, False, client)

    def _served_teacher(self, args, url: str, teacher, teacher_processing_class, student_tokenizer, model):
        """`(client, tokenizer, served model entry)` of the teacher behind `url`: asked for its name (waiting for it
        within teacher_server_max_wait), its tokenizer checked against the student's. The tokenizer is the one given,
        else the named teacher's, else the one of the served model's name (vLLM's `root`: the Hub id or path it
        loaded)."""
        client = TeacherClient(url, args.teacher_server_k, len(student_tokenizer),
                               batch_size=args.teacher_server_batch_size, concurrency=args.teacher_server_concurrency,
                               timeout=args.teacher_server_timeout, max_wait=args.teacher_server_max_wait)
        served = client.served_model()
        served_name = served.get("root") or served["id"]
        if teacher_processing_class is not None or teacher is not None:
            tokenizer = load_teacher_tokenizer(teacher if teacher is not None else served_name,
                                               teacher_processing_class, student_tokenizer)
        else:
            try:
                tokenizer = load_teacher_tokenizer(served_name)
            except (OSError, ValueError) as error:
                raise ValueError(
                    f"teacher_url={client.public_url!r} serves {served_name!r}, whose tokenizer does not load here "
                    f"({str(error).splitlines()[0][:200]}): pass teacher_processing_class=<its tokenizer>, or set "
                    "teacher_model_name_or_path to the teacher's Hub id or local path (it is not loaded).") from None
        # Named by where the tokenizer came from: the one given, the named teacher's, or the served model's name.
        if teacher_processing_class is not None:
            source = f"the teacher_processing_class given for the server at {client.public_url}"
        elif teacher is not None:
            source = f"{model_name(teacher)} (teacher_model_name_or_path, for the server at {client.public_url})"
        else:
            source = f"{served_name} (the model served at {client.public_url})"
        self._check_tokenizers(args, student_tokenizer, tokenizer, model_name(model), source)
        return client, tokenizer, served

    def _set_up_teacher(self, plan: TeacherPlan, args) -> PreTrainedModel:
        """After the parent `__init__`: `self.teacher_model` prepared for training; returns the unwrapped teacher.
        With a teacher cache there is none: the cache is written first if need be, and read in its place."""
        self.teacher_cache, self.teacher_client, self.teacher_members = None, plan.client, None
        if plan.members is not None:
            if args.kd_weight > 0:  # else SFT: no teacher is asked anything
                self._set_up_members(plan.members, args)
            self.teacher_model = None
            return None
        if plan.client is not None:  # the server is the teacher: each batch asks it for its targets
            if args.kd_weight > 0:
                self.data_collator = ServedTeacherCollator(self.data_collator, plan.client,
                                                           prefetch=args.teacher_server_prefetch)
            self.teacher_model = None
            return None
        if getattr(args, "teacher_cache", None) is not None:
            self._set_up_teacher_cache(plan, args)
            self.teacher_model = None
            return None
        teacher = self._loaded_teacher(plan, args)
        self._attach_trainable_modules(teacher)  # before DeepSpeed partitions the teacher: both heads are whole
        self.teacher_model = self._prepared_teacher(teacher)
        return teacher

    def _prepared_teacher(self, teacher: PreTrainedModel):
        """A loaded teacher prepared for training beside the student: by DeepSpeed (its inference engine) or by
        accelerate in evaluation mode."""
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _loaded_teacher(self, plan: TeacherPlan, args) -> PreTrainedModel:
        """The teacher loaded and frozen, its head checked against the student's and both tokenizers."""
        return self._checked_teacher_heads(freeze(self._load_teacher_model(plan.teacher, args)), plan, args)

    def _checked_teacher_heads(self, teacher: PreTrainedModel, plan: TeacherPlan, args) -> PreTrainedModel:
        """`teacher`, after checking its head against the student's (when the student's tokenizer was assumed) and
        both heads against their tokenizers."""
        if plan.assumes_student_tokenizer and self._compares_logits(args):
            check_same_head_size(self.model, teacher)
        for role, head_model, tokenizer in (("student", self.model, self.processing_class),
                                            ("teacher", teacher, plan.tokenizer)):
            rows = output_head_shape(head_model)[0]
            if rows < len(tokenizer):
                raise ValueError(
                    f"The {role}'s output head has {rows} rows but its tokenizer has {len(tokenizer)} tokens. "
                    f"Resize it: {role}.resize_token_embeddings(len(tokenizer))."
                )
        return teacher

    def _attach_cache(self, cache: TeacherCache, hashes: dict, suffix: str = "") -> None:
        """The cache's records joined to the train and eval splits, row by row."""
        attached = {name: cache.attach(dataset, name, hashes[name], suffix)
                    for name, dataset in self._cache_splits().items()}
        self.train_dataset = attached.pop("train")
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {name[len("eval_"):]: dataset for name, dataset in attached.items()}
        elif self.eval_dataset is not None:
            self.eval_dataset = attached["eval"]

    def _split_fingerprints(self) -> tuple[dict, dict]:
        """`({split: {rows, fingerprint}}, {split: row hashes})` of the splits a cache is keyed to."""
        data, hashes = {}, {}
        for name, dataset in self._cache_splits().items():
            data[name], hashes[name] = split_fingerprint(dataset)
        return data, hashes

    def _cache_splits(self) -> dict:
        """`{name: tokenized dataset}` the loss reads: `train`, and `eval` (or `eval_<name>` for a dict of them)."""
        splits = {"train": self.train_dataset}
        if isinstance(self.eval_dataset, dict):
            splits.update({f"eval_{name}": dataset for name, dataset in self.eval_dataset.items()})
        elif self.eval_dataset is not None:
            splits["eval"] = self.eval_dataset
        return splits

    def _set_up_teacher_cache(self, plan: TeacherPlan, args) -> None:
        """The cache at `args.teacher_cache`, written by the teacher when it is not complete, checked against the
        trainer's own tokenized data, and joined to it: each row carries its teacher record, which the collator
        turns into the batch's sparse targets."""
        splits = self._cache_splits()
        data, hashes = self._split_fingerprints()
        settings = CacheSettings.for_run(args.teacher_cache_mode, args.teacher_cache_k, len(self.processing_class),
                                         args.kd_temperature, args.teacher_cache_temperatures)
        tokenizer = tokenizer_fingerprint(self.processing_class)
        try:
            cache = TeacherCache.open(args.teacher_cache)
            if cache is not None:
                check_whole(cache.path, cache.info)
        except CacheProblem:
            if plan.teacher is None:  # nothing here can rewrite it: the problem, with its fix
                raise
            cache = None  # the pass below rewrites what is damaged
        if cache is None and plan.teacher is None:
            raise CacheProblem(f"teacher_cache={args.teacher_cache!r} holds no complete, whole teacher cache, and no "
                               f"teacher is named to write it; {integrity_fix(args.teacher_cache)}.")
        named = None if plan.teacher is None else {  # what a run that names its teacher can check without loading it
            "name": model_name(plan.teacher), "adapter": args.teacher_adapter_name_or_path,
            "files": teacher_files_fingerprint(plan.teacher)}
        if cache is None:
            teacher = self._loaded_teacher(plan, args)
            if any(hasattr(param, "ds_id") for param in teacher.parameters()):
                raise ValueError(
                    f"teacher_cache={args.teacher_cache!r} is written by the teacher whole on each process, and "
                    "DeepSpeed ZeRO-3 has partitioned it. Write the cache first without ZeRO-3 (kd-train "
                    "cache-teacher RECIPE accelerate.config=multi_process), then train from it under ZeRO-3.")
            teacher.to(self.accelerator.device)
            components = cache_components({**named, "weights": teacher_fingerprint(teacher)}, tokenizer, data,
                                          settings)
            pad_id = self.processing_class.pad_token_id
            cache = write_teacher_cache(
                args.teacher_cache, teacher, splits, hashes, components, settings,
                self.processing_class.eos_token_id if pad_id is None else pad_id, self.accelerator,
                batch_size=args.teacher_cache_batch_size, seed=args.seed,
                log=lambda message: print(message, flush=True))
            del teacher
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        cache.check(tokenizer, data, settings, named)
        cache.tempered_index(args.kd_temperature)  # a temperature the cache does not store: refused now
        self._attach_cache(cache, hashes)
        self.data_collator = SparseTeacherCollator(self.data_collator, cache, temperature=args.kd_temperature)
        self.teacher_cache = cache
        self.teacher_name = cache.describe()

    # ----------------------------------------------------------------------------------------------------------------
    # Hooks

    def _compares_logits(self, args) -> bool:
        """Whether the loss compares the two models' distributions token id by token id (Seq-KD's SFT does not)."""
        return True

    def _load_teacher_tokenizer(self, teacher, teacher_processing_class, args, student_tokenizer):
        return load_teacher_tokenizer(teacher, teacher_processing_class, student_tokenizer)

    def _check_tokenizers(self, args, student_tokenizer, teacher_tokenizer, student_name: str,
                          teacher_name: str) -> None:
        """Logit KD compares the two distributions id by id: the vocabularies must be the same."""
        if self._compares_logits(args):
            check_same_vocabulary(student_tokenizer, teacher_tokenizer, student_name, teacher_name)

    def _load_teacher_model(self, teacher, args) -> PreTrainedModel:
        """The teacher, loaded from its name if need be (with `trust_remote_code` as for the student, as TRL's GKD does),
        with its adapter merged."""
        return load_teacher(teacher, self._teacher_init_kwargs(teacher, args), args.teacher_adapter_name_or_path)

    @staticmethod
    def _teacher_init_kwargs(teacher, args) -> dict | None:
        """`teacher_model_init_kwargs`, with the student's `trust_remote_code` for a teacher loaded by name."""
        init_kwargs = args.teacher_model_init_kwargs
        if isinstance(teacher, str):
            init_kwargs = {"trust_remote_code": args.trust_remote_code, **(init_kwargs or {})}
        return init_kwargs

    def _attach_trainable_modules(self, teacher: PreTrainedModel) -> None:
        """Adds what the method trains beside the student's weights (DSKD's projectors) to the student; called with the
        loaded, frozen teacher. Vanilla KD adds nothing."""
