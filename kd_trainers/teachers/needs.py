"""What a method needs of its teacher, stated once by the method (its config's `teacher_needs()`), and the one check
that compares need and kind: a kind the method cannot use is refused before anything loads, with one message shape,
`<field>=<value>: <why, and what to do instead>`."""

from __future__ import annotations

from dataclasses import dataclass, field


# The argument that chooses each kind that can be refused (a teacher in memory serves every method).
KIND_FIELDS = {"cache": "teacher_cache", "url": "teacher_url", "mixture": "teacher_models"}
# The kinds a config's own field chooses, which stand in for a teacher model in memory (no model sits beside the
# student while it trains); several teachers come as trainer arguments (`teacher_models`), not config fields.
STAND_IN_KINDS = ("url", "cache")


def stand_in(config) -> tuple[str, object] | None:
    """`(field, value)` of the teacher kind that stands in for a model in memory in `config` (`teacher_url`, else
    `teacher_cache`), or None when the teacher is a model (or the config has no such field: a method that cannot use
    either). The one place that asks a config which kind it chose; the kinds themselves are in `teachers/`."""
    for kind in STAND_IN_KINDS:
        value = getattr(config, KIND_FIELDS[kind], None)
        if value is not None:
            return KIND_FIELDS[kind], value
    return None


def stand_in_tokenization(config) -> str:
    """Whose tokenization a stand-in teacher (a cache, a server) is read at (`kd_trainers.teacher_cache.
    TOKENIZATIONS`): the student's, the one vocabulary of logit KD, unless the method's config says otherwise
    (`stand_in_tokenization`: a method that aligns two tokenizations reads the teacher at its own label tokens)."""
    return getattr(config, "stand_in_tokenization", "student")


@dataclass(frozen=True)
class TeacherNeeds:
    """`refused`: `{kind: why}` for each teacher kind (`cache`, `url`, `mixture`) the method cannot use, e.g. DSKD's
    projectors need a model's hidden states, which a cache or a server does not hold."""

    refused: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        unknown = sorted(set(self.refused) - set(KIND_FIELDS))
        if unknown:
            raise ValueError(f"TeacherNeeds refuses unknown teacher kinds {unknown}; the kinds are "
                             f"{list(KIND_FIELDS)}.")

    def check(self, kind: str, value) -> None:
        """Refuses a teacher of `kind`, given as `value` (the field's value), when the method cannot use it."""
        if kind in self.refused:
            raise ValueError(f"{KIND_FIELDS[kind]}={value!r}: {self.refused[kind]}")

    def check_config(self, config) -> None:
        """The kinds a config's own fields choose (`teacher_cache`, `teacher_url`)."""
        for kind in STAND_IN_KINDS:
            value = getattr(config, KIND_FIELDS[kind], None)
            if value is not None:
                self.check(kind, value)
