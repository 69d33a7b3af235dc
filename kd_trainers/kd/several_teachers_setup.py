"""Several teachers at once in a trainer (`KDTrainer(teacher_models=[...])`, a recipe's `teachers:`): each planned
before the parent trainer's `__init__` as one teacher of its kind is (`_plan_teachers`), set up after it
(`_set_up_members`: models loaded and prepared, caches joined to the data under their own columns, servers asked by
their own collators, the routing column read), and mixed in the loss (`_mixture_terms`, through
`kd_trainers.losses.mixture_distillation_terms`). The entries and the routing collator are
`kd_trainers.several_teachers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..hidden_states import last_hidden_state
from ..losses import DenseMember, LogitTransform, SparseMember, mixture_distillation_terms
from ..served_teacher import TARGETS_KEY, ServedTeacherCollator, TeacherClient
from ..several_teachers import ROUTE_KEY, RoutingCollator, TeacherEntry, check_routing
from ..teacher import freeze, load_teacher
from ..teacher_cache import (BATCH_KEYS, CacheSettings, SparseTeacherCollator, TeacherCache, targets_from_batch,
                             tokenizer_fingerprint)
from ..teacher_cache.cache import RECORD_COLUMNS
from ..teacher_cache.integrity import check_whole
from .teacher_setup import TeacherPlan


@dataclass
class PlannedMember:
    """One of several teachers, planned: its entry, its tokenizer, its client (a server) or its cache."""

    entry: TeacherEntry
    tokenizer: PreTrainedTokenizerBase
    assumes_student_tokenizer: bool = False
    client: TeacherClient | None = None
    cache: TeacherCache | None = None


@dataclass
class TeacherMember:
    """One of several teachers, set up: a model prepared for training (`wrapped`, `unwrapped`, its logit `transform`),
    or the batch keys its sparse targets arrive under (a cache's `suffix`, a server's `key`)."""

    entry: TeacherEntry
    wrapped: object = None
    unwrapped: PreTrainedModel | None = None
    transform: LogitTransform = LogitTransform()
    cache: TeacherCache | None = None
    suffix: str = ""
    key: str | None = None


class SeveralTeachersMixin:
    """The several-teacher parts of a trainer; mix into `KDTrainer` beside `TeacherSetupMixin`, which calls
    `_plan_teachers` and `_set_up_members`, and `DistillationLossMixin`, which calls `_mixture_terms`."""

    def _plan_teachers(self, model, args, teacher_model, entries: list[TeacherEntry],
                       student_tokenizer: PreTrainedTokenizerBase) -> TeacherPlan:
        """Several teachers (`teacher_models`): each checked as one teacher of its kind is, before anything loads."""
        given = [name for name, value in (("teacher_model", teacher_model),
                                          ("teacher_model_name_or_path", args.teacher_model_name_or_path),
                                          ("teacher_cache", getattr(args, "teacher_cache", None)),
                                          ("teacher_url", getattr(args, "teacher_url", None))) if value is not None]
        if given:
            raise ValueError(f"teacher_models lists the teachers, and {', '.join(given)} names one more: give the "
                             "teachers in one place (add it to teacher_models).")
        check_routing(entries, args.teacher_column)
        members = []
        for index, entry in enumerate(entries):
            where = f"teacher_models[{index}] ({entry.name})"
            if entry.kind == "model":
                tokenizer, assumed = self._checked_teacher_tokenizer(model, args, entry.source, entry.tokenizer,
                                                                     student_tokenizer)
                members.append(PlannedMember(entry, tokenizer, assumed))
            elif entry.kind == "url":
                args.check_served_temperature(f"{where}: url={entry.source!r}", len(student_tokenizer))
                client, tokenizer, _ = self._served_teacher(args, entry.source, None, entry.tokenizer,
                                                            student_tokenizer, model)
                members.append(PlannedMember(entry, tokenizer, client=client))
            else:
                cache = TeacherCache.open(entry.source)
                if cache is None:
                    raise ValueError(f"{where}: cache={entry.source!r} holds no complete teacher cache: write it "
                                     "first (kd-train cache-teacher RECIPE teacher_cache=PATH with that teacher).")
                check_whole(cache.path, cache.info)  # a damaged block: named, with the pass that rewrites it
                members.append(PlannedMember(entry, student_tokenizer, cache=cache))
        self.teacher_processing_class = student_tokenizer
        how = f"routed by the column {args.teacher_column!r}" if args.teacher_column else "mixed per token"
        self.teacher_name = f"{len(entries)} teachers, {how}"
        return TeacherPlan(None, student_tokenizer, False, members=members)

    def _set_up_members(self, planned: list[PlannedMember], args) -> None:
        """Several teachers: models loaded and prepared as one teacher is; caches checked against the trainer's data
        and joined to it under their own columns; servers asked by their own collator; the routing column read."""
        members, keys, columns = [], [], []
        data = hashes = None
        for index, plan in enumerate(planned):
            entry, suffix = plan.entry, f"_{index}"
            if entry.kind == "model":  # loaded, frozen, checked and prepared as one teacher is, with its own adapter
                loaded = freeze(load_teacher(entry.source, self._teacher_init_kwargs(entry.source, args),
                                             entry.adapter))
                teacher = self._checked_teacher_heads(
                    loaded, TeacherPlan(entry.source, plan.tokenizer, plan.assumes_student_tokenizer), args)
                members.append(TeacherMember(entry, self._prepared_teacher(teacher), teacher,
                                             LogitTransform.from_config(teacher.config)))
            elif entry.kind == "cache":
                if data is None:
                    data, hashes = self._split_fingerprints()
                cache = plan.cache
                cache.check(tokenizer_fingerprint(self.processing_class), data,
                            CacheSettings(cache.mode, cache.k, len(self.processing_class)), None)
                cache.tempered_index(args.kd_temperature)
                self._attach_cache(cache, hashes, suffix)
                self.data_collator = SparseTeacherCollator(self.data_collator, cache, suffix, args.kd_temperature)
                members.append(TeacherMember(entry, cache=cache, suffix=suffix))
                keys += [key + suffix for key in BATCH_KEYS]
                columns += [column + suffix for column in RECORD_COLUMNS]
            else:
                self.data_collator = ServedTeacherCollator(self.data_collator, plan.client,
                                                           prefetch=args.teacher_server_prefetch,
                                                           key=TARGETS_KEY + suffix)
                members.append(TeacherMember(entry, wrapped=plan.client, key=TARGETS_KEY + suffix))
                keys.append(TARGETS_KEY + suffix)
        if args.teacher_column is not None:
            names = [plan.entry.name for plan in planned]
            routing = RoutingCollator(self.data_collator, args.teacher_column, names)
            for split, dataset in self._cache_splits().items():
                if args.teacher_column not in dataset.column_names:
                    raise ValueError(f"teacher_column={args.teacher_column!r} is not a column of the {split} data "
                                     f"(it has {dataset.column_names}).")
                for value in dataset.unique(args.teacher_column):
                    routing.index(value)  # a value that names no teacher fails here, before training
            self.data_collator = routing
            keys.append(ROUTE_KEY)
            columns.append(args.teacher_column)
        self.teacher_members = members
        self._non_model_keys = (*type(self)._non_model_keys, *keys)
        self._member_columns = columns

    def _mixture_terms(self, student_hidden, student, inputs: dict, model_inputs: dict, labels, mode: str,
                       engine: dict):
        """The engine against the teachers of `teacher_models`: a model's hidden states, a cache's or a server's
        targets; weights per teacher, or one teacher per row (`teacher_column`)."""
        members = []
        for member in self.teacher_members:
            if member.unwrapped is not None:
                with torch.no_grad():
                    hidden = self._forward_redirection(member.wrapped, member.unwrapped, last_hidden_state,
                                                       member.unwrapped, model_inputs)[:, :-1]
                members.append(DenseMember(hidden, member.unwrapped.get_output_embeddings(), member.transform))
            elif member.cache is not None:
                members.append(SparseMember(targets_from_batch(inputs, member.cache.mode, member.suffix,
                                                                   self.args.kd_temperature),
                                            self.args.teacher_cache_tail))
            else:
                members.append(SparseMember(inputs[member.key].get(), self.args.teacher_server_tail))
        if self.args.teacher_column is not None:
            weights = torch.nn.functional.one_hot(inputs[ROUTE_KEY], len(members)).float()
        else:
            weights = torch.tensor([member.entry.weight for member in self.teacher_members])
        return mixture_distillation_terms(student_hidden, student.get_output_embeddings(), members, weights, labels,
                                          self._settings_for(mode), **engine)
