"""Several teachers at once (`teacher_models`, a recipe's `teachers:`): each a teacher of another kind (a model, a
cache or a server, `entries.py` reads the entries), planned and set up as that kind is, with its own
batch keys; the engine mixes them per token (`kd_trainers.losses.mixture`), by weight, or routes each example to one
of them by a dataset column (`teacher_column`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..losses import MixedTeachers
from .entries import ROUTE_KEY, RoutingCollator, check_routing
from .base import Teacher, TeacherDescription, register_teacher_kind
from .cached import CachedTeacher, cache_splits, split_fingerprints
from .loading import model_name
from .resident import ResidentTeacher
from .served import ServedTeacher


@dataclass
class SeveralTeachersFields:
    """The config field of several teachers (documented on `KDConfig`): the routing column."""

    teacher_column: str | None = field(
        default=None, metadata={"help": "With several teachers: the column naming each example's one teacher."})


@register_teacher_kind
class MixtureTeacher(Teacher):
    """`members`: the teachers (one of the other kinds each), in the order of `entries`."""

    kind = "mixture"

    def __init__(self, entries: list, members: list[Teacher], tokenizer, name: str, column: str | None):
        super().__init__(None, tokenizer, name)
        self.entries, self.members, self.column = entries, members, column
        self.member_names = tuple(entry.name for entry in entries)
        self.ready = False  # set up: at kd_weight 0 no teacher is asked anything

    @classmethod
    def chosen_by(cls, args, entries) -> bool:
        return bool(entries)

    @classmethod
    def plan(cls, host, model, args, teacher_model, teacher_processing_class, student_tokenizer, entries=None):
        """Each teacher checked as one teacher of its kind is, before anything loads."""
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
            if entry.kind == "model":
                tokenizer, assumed = host._checked_teacher_tokenizer(model, args, entry.source, entry.tokenizer,
                                                                     student_tokenizer)
                members.append(ResidentTeacher(entry.source, tokenizer, model_name(entry.source), assumed,
                                               adapter=entry.adapter, member=entry.name))
            elif entry.kind == "url":
                members.append(ServedTeacher.member_of(host, entry, index, args, student_tokenizer, model))
            else:
                members.append(CachedTeacher.member_of(entry, index, args, student_tokenizer))
        how = f"routed by the column {args.teacher_column!r}" if args.teacher_column else "mixed per token"
        return cls(entries, members, student_tokenizer, f"{len(entries)} teachers, {how}", args.teacher_column)

    def set_up(self, host, args) -> None:
        """Every teacher set up as one of its kind is (under its own batch keys), then the routing column read."""
        if args.kd_weight == 0:  # SFT: no teacher is asked anything
            return
        caches = [member for member in self.members if isinstance(member, CachedTeacher)]
        if caches:  # every cache is keyed to the same rows: hashed once, before any is joined to them
            fingerprints = split_fingerprints(host)
            for member in caches:
                member.fingerprints = fingerprints
        for member in self.members:
            member.set_up(host, args)
        keys = [key for member in self.members for key in member.batch_keys]
        columns = [column for member in self.members for column in member.columns]
        if self.column is not None:
            routing = RoutingCollator(host.data_collator, self.column, [entry.name for entry in self.entries])
            for split, dataset in cache_splits(host).items():
                if self.column not in dataset.column_names:
                    raise ValueError(f"teacher_column={self.column!r} is not a column of the {split} data (it has "
                                     f"{dataset.column_names}).")
                for value in dataset.unique(self.column):
                    routing.index(value)  # a value that names no teacher fails here, before training
            host.data_collator = routing
            keys.append(ROUTE_KEY)
            columns.append(self.column)
        self.batch_keys, self.columns, self.ready = tuple(keys), tuple(columns), True

    def eval_(self) -> None:
        for member in self.members:
            member.eval_()

    def head_checks(self, model_inputs: dict, vocab_size: int) -> list[tuple]:
        return [check for member in self.members for check in member.head_checks(model_inputs, vocab_size)]

    def engine_source(self, host, inputs: dict, model_inputs: dict) -> MixedTeachers:
        """The members' sources; weights per teacher, or one teacher per row (`teacher_column`)."""
        sources = [member.engine_source(host, inputs, model_inputs) for member in self.members]
        if self.column is not None:
            weights = torch.nn.functional.one_hot(inputs[ROUTE_KEY], len(sources)).float()
        else:
            weights = torch.tensor([entry.weight for entry in self.entries])
        return MixedTeachers(sources, weights)

    def describe(self) -> TeacherDescription:
        if not self.ready:
            return TeacherDescription()
        routed, total = self.column is not None, sum(entry.weight for entry in self.entries)
        card = {"teachers": "; ".join(f"{entry.name}: {entry.describe()}" +
                                      ("" if routed else f" (weight {entry.weight / total:.4g})")
                                      for entry in self.entries), "teacher_column": self.column}
        run_info = {"teachers": [{"name": entry.name, "kind": entry.kind, "teacher": entry.describe(),
                                  "weight": entry.weight} for entry in self.entries]}
        return TeacherDescription(card, run_info)

    def close(self) -> None:
        for member in self.members:
            member.close()
