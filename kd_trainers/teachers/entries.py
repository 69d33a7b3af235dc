"""Several teachers at once: the entries of a trainer's `teacher_models` (a recipe's `teachers:`), and the collator
that routes each example to one teacher by a dataset column (`teacher_column`).

An entry is a teacher in memory (`model`: a model, a Hub id or a path, with an optional `adapter`), a teacher cache
(`cache`: a folder holding a complete one) or a served teacher (`url`), with a `weight` (1 by default) and a `name`
(`teacher0`, `teacher1`, ... by default; the logs' `kd_loss_<name>` and the routing column use it); a served
teacher may give its `tokenizer` (else the one of the served model's name is loaded), and so may a model (one built
in memory has no name to load it from; else the one beside its name or path is loaded). A plain model or
name in the list is `{model: it}`. Per token the target is the weighted mixture of the teachers' distributions
(`kd_trainers.losses.mixture_distillation_terms`), or, with `teacher_column`, the distribution of the one teacher
the example's column names.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .loading import model_name


KINDS = ("model", "cache", "url")
ENTRY_KEYS = (*KINDS, "weight", "name", "adapter", "tokenizer")
ROUTE_KEY = "teacher_route"  # the batch key of each row's teacher index (the trainers keep it away from the models)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class TeacherEntry:
    """One teacher of several: `kind` (model, cache or url), `source` (the model or its name, the cache folder, the
    URL), `weight`, `name`, and a model's `adapter`."""

    name: str
    kind: str
    source: object
    weight: float = 1.0
    adapter: str | None = None
    weight_given: bool = False
    tokenizer: object = None

    def describe(self) -> str:
        if self.kind == "model":
            return model_name(self.source) + (f" + adapter {self.adapter}" if self.adapter else "")
        return f"{'teacher cache' if self.kind == 'cache' else 'served at'} {self.source}"


def teacher_entries(values, field: str = "teacher_models") -> list[TeacherEntry]:
    """The entries of a list of teachers, checked; a `ValueError` names the entry, the key, the value and the fix."""
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{field} must be a non-empty list of teachers (each a model, or {{model | cache | url: ..., "
                         f"weight: ..., name: ...}}), got {values!r}.")
    entries = []
    for index, value in enumerate(values):
        where = f"{field}[{index}]"
        if not isinstance(value, dict):
            value = {"model": value}
        unknown = sorted(set(value) - set(ENTRY_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; a teacher has {list(ENTRY_KEYS)}.")
        kinds = [kind for kind in KINDS if value.get(kind) is not None]
        if len(kinds) != 1:
            raise ValueError(f"{where}: give exactly one of model, cache and url (the teacher in memory, its cache, "
                             f"its server), got {kinds or 'none'}.")
        weight = value.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight <= 0:
            raise ValueError(f"{where}.weight: {weight!r} should be a number > 0 (weights are normalised to sum 1).")
        name = value.get("name", f"teacher{index}")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{where}.name: {name!r} should be letters, digits, '_', '.' or '-' (it names the logs' "
                             "kd_loss_<name>).")
        if value.get("adapter") is not None and kinds[0] != "model":
            raise ValueError(f"{where}.adapter: only a teacher in memory (model) takes an adapter.")
        if value.get("tokenizer") is not None and kinds[0] == "cache":
            raise ValueError(f"{where}.tokenizer: a cache's tokenizer is the student's (it was written for it); "
                             "remove the key.")
        source = value[kinds[0]]
        if kinds[0] != "model" and not isinstance(source, str):
            what = "folder" if kinds[0] == "cache" else "URL"
            raise ValueError(f"{where}.{kinds[0]}: {source!r} should be a {what}.")
        entries.append(TeacherEntry(name, kinds[0], source, float(weight), value.get("adapter"), "weight" in value,
                                    value.get("tokenizer")))
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"{field}: the names {names} repeat; give each teacher its own name.")
    return entries


def check_routing(entries: list[TeacherEntry], column: str | None, field: str = "teacher_models") -> None:
    """With `teacher_column` each example has one teacher: weights would mix nothing, so they are refused."""
    if column is None:
        return
    weighted = [entry.name for entry in entries if entry.weight_given]
    if weighted:
        raise ValueError(f"teacher_column={column!r} routes each example to one teacher, so the weights of {weighted} "
                         f"would do nothing: drop them from {field}, or drop teacher_column to mix the teachers.")


class RoutingCollator:
    """Wraps a collator: each example's `column` (a teacher's name, or its index) becomes its row of
    `batch["teacher_route"]` `[B]`, the teacher's index."""

    def __init__(self, collator, column: str, names: list[str]):
        self.collator, self.column, self.names = collator, column, names

    def index(self, value) -> int:
        if isinstance(value, str) and value in self.names:
            return self.names.index(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(self.names):
            return value
        raise ValueError(f"teacher_column={self.column!r}: the value {value!r} names no teacher; the teachers are "
                         f"{self.names} (or their indices 0..{len(self.names) - 1}).")

    def __call__(self, examples: list[dict]) -> dict:
        examples = [dict(example) for example in examples]
        route = [self.index(example.pop(self.column)) for example in examples]
        batch = self.collator(examples)
        batch[ROUTE_KEY] = torch.tensor(route, dtype=torch.long)
        return batch
