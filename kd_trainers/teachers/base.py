"""The interface every teacher kind implements, and the registry that picks a trainer's kind from its arguments.

A teacher lives in two steps around the parent trainer's `__init__`:

    teacher = plan_teacher(host, model, args, teacher_model, teacher_processing_class, student_tokenizer, entries)
        # before: no model loaded; the kind's cheap checks (tokenizers, vocabularies, a cache's completeness, a
        # server's answer), so that a mismatch fails before the dataset is tokenized
    super().__init__(...)          # SFTTrainer: the student, its data, accelerate / DeepSpeed
    teacher.set_up(host, args)     # after: load and prepare, or open and join to the data, or connect

and then, per batch, `engine_source(host, inputs, model_inputs)` hands the loss engine the teacher's side of the
batch (a model's hidden states and head, or sparse targets, or a mixture of them), and `describe()` is the one record
of it that the model card and `run_info.json` show. The `host` is the trainer: a kind reads its data, collator and
accelerator, and calls the method's hooks (`_checked_teacher_tokenizer`, `_load_teacher_model`,
`_attach_trainable_modules`), so that a method changes a step without writing the set-up again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from ..losses import LogitTransform


@dataclass
class TeacherDescription:
    """What a run records of its teacher: `card` rows of the model card's KD table (`{setting: value}`, None rows
    hidden), and `run_info` entries of `run_info.json` (`{key: value}`)."""

    card: dict = field(default_factory=dict)
    run_info: dict = field(default_factory=dict)


class Teacher:
    """One teacher of a trainer, whatever its kind (`kind`: model, cache, url or mixture).

    Attributes set when it is planned: `source` (the model or its name as given; None where there is none), `tokenizer`
    (the teacher's), `name` (what the logs and the model card call it), `assumes_student_tokenizer`.
    """

    kind: str = ""
    member_names: tuple[str, ...] = ()  # several teachers: their names, in the order of the engine's per-teacher terms
    # Batch keys beyond the trainer's own that its collators add (the models never receive them), and dataset columns
    # its collators read (kept by the trainer's column filter).
    batch_keys: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()

    def __init__(self, source, tokenizer: PreTrainedTokenizerBase, name: str | None,
                 assumes_student_tokenizer: bool = False):
        self.source, self.tokenizer, self.name = source, tokenizer, name
        self.assumes_student_tokenizer = assumes_student_tokenizer

    # -- chosen from the trainer's arguments ---------------------------------------------------------------------------

    @classmethod
    def chosen_by(cls, args, entries) -> bool:
        """Whether a trainer with `args` (and several teachers' `entries`, or None) has a teacher of this kind."""
        raise NotImplementedError

    @classmethod
    def plan(cls, host, model, args, teacher_model, teacher_processing_class, student_tokenizer, entries) -> "Teacher":
        """Before the parent trainer's `__init__`: the teacher checked as far as it can be without loading a model."""
        raise NotImplementedError

    # -- after the parent trainer's __init__ ---------------------------------------------------------------------------

    def set_up(self, host, args) -> None:
        """Load and prepare, open, or connect; join to the trainer's data and wrap its collator as the kind needs."""

    # -- per batch -----------------------------------------------------------------------------------------------------

    @property
    def model(self):
        """The model prepared for training beside the student (accelerate or DeepSpeed), or None for a teacher that is
        not a model in this process."""
        return None

    @property
    def transform(self) -> LogitTransform:
        """The logit scale and soft-capping of the teacher's head (none for a teacher not in memory)."""
        return LogitTransform()

    def eval_(self) -> None:
        """Evaluation mode for whatever model it holds (the trainer's `train()` may have switched it)."""

    def head_checks(self, model_inputs: dict, vocab_size: int) -> list[tuple]:
        """`[(role, wrapped model, its inputs, transform, vocabulary)]`: the models whose fused logits the first batch
        compares with their own forward (`kd_trainers.kd.heads`)."""
        return []

    def engine_source(self, host, inputs: dict, model_inputs: dict):
        """The teacher's side of the batch for the loss engine (`kd_trainers.losses.teacher_distillation_terms`): a
        `DenseMember` (hidden states `[B, T-1, D]`, head, transform), a `SparseMember` (targets `[N, k]`, tail) or a
        `Mixture` of them."""
        raise NotImplementedError

    def describe(self) -> TeacherDescription:
        return TeacherDescription()

    def close(self) -> None:
        """Stops what it has in flight (a server's requests) when training stops on an error."""


TEACHER_KINDS: list[type[Teacher]] = []  # exactly one kind's `chosen_by` says yes to a trainer's arguments


def register_teacher_kind(kind: type[Teacher]) -> type[Teacher]:
    """Class decorator: a teacher kind the trainers choose among (the first whose `chosen_by` says yes)."""
    TEACHER_KINDS.append(kind)
    return kind


def plan_teacher(host, model, args, teacher_model, teacher_processing_class, student_tokenizer,
                 entries=None) -> Teacher:
    """The trainer's teacher, of the first registered kind its arguments choose, planned (nothing loaded); sets the
    host's `teacher_processing_class` and `teacher_name`."""
    if getattr(args, "teacher_column", None) is not None and not entries:
        raise ValueError(f"teacher_column={args.teacher_column!r} routes examples among several teachers, and "
                         f"{type(host).__name__} has one: pass teacher_models=[...] (a recipe's teachers:), or "
                         "drop teacher_column.")
    chosen = [kind for kind in TEACHER_KINDS if kind.chosen_by(args, entries)]
    assert len(chosen) == 1, f"the teacher kinds {[kind.kind for kind in chosen]} are all chosen by these arguments"
    kind = chosen[0]
    # The method's needs against the kind, before anything loads (a config's own fields were checked when it was made).
    args.teacher_needs().check(kind.kind, [entry.name for entry in entries] if entries else None)
    teacher = kind.plan(host, model, args, teacher_model, teacher_processing_class, student_tokenizer, entries)
    host.teacher_processing_class, host.teacher_name = teacher.tokenizer, teacher.name
    return teacher
