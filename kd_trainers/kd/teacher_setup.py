"""The one teacher set-up of every trainer with a teacher (KD, DSKD, Seq-KD, GKD), in two calls around the parent
trainer's `__init__`:

    teacher = self._plan_teacher(model, args, teacher_model, teacher_processing_class, student_tokenizer)
        # before: the teacher of its kind (`kd_trainers.teachers`) checked without loading a model, so that a
        # mismatch fails before the dataset is tokenized
    super().__init__(...)                      # SFTTrainer: the student, its data, accelerate / DeepSpeed
    self._set_up_teacher(teacher, args)
        # after: loaded and prepared, opened and joined to the data, or connected; held as `self.teacher`

The kinds themselves are `kd_trainers.teachers`; what is here are the method's hooks they call (which teacher is
required, how its tokenizer is loaded and checked, how its model is loaded, what the method trains beside the
student), so that a method changes a step without writing the set-up again.
"""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..teachers import Teacher, plan_teacher
from ..teachers.loading import check_same_head_size, check_same_vocabulary, load_teacher_tokenizer, model_name
from ..teachers.needs import stand_in
from ..teachers.resident import load_model_teacher


class TeacherSetupMixin:
    """`_plan_teacher` and `_set_up_teacher` (see the module docstring), the hooks a method may override, and the
    read-only views of the teacher that TRL and earlier releases name (`teacher_model`, `teacher_cache`,
    `teacher_client`)."""

    teacher: Teacher | None = None
    _teacher_entries: list | None = None  # several teachers (`teacher_models`), read by KDTrainer

    @classmethod
    def _required_teacher(cls, teacher_model, args):
        """The teacher given, else the config's name for it; a clear error when there is neither."""
        teacher = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if stand_in(args) is not None:
            return teacher  # None too: the server is the teacher, or a complete cache is (`CachedTeacher.plan`)
        if teacher is None:
            raise ValueError(f"{cls.__name__} needs a teacher: pass teacher_model=<model or name> or set "
                             f"{type(args).__name__}.teacher_model_name_or_path.")
        return teacher

    def _plan_teacher(self, model, args, teacher_model, teacher_processing_class,
                      student_tokenizer: PreTrainedTokenizerBase) -> Teacher:
        """Before the parent `__init__`: sets `teacher_processing_class` and `teacher_name`; loads no model."""
        return plan_teacher(self, model, args, teacher_model, teacher_processing_class, student_tokenizer,
                            self._teacher_entries)

    def _set_up_teacher(self, teacher: Teacher, args) -> None:
        """After the parent `__init__`: `self.teacher` set up (see `kd_trainers.teachers.base`); its batch keys are
        kept from the models."""
        teacher.set_up(self, args)
        self.teacher = teacher
        self._non_model_keys = (*type(self)._non_model_keys, *teacher.batch_keys)

    # ----------------------------------------------------------------------------------------------------------------
    # Views

    @property
    def teacher_model(self):
        """The teacher prepared beside the student (TRL's name), or None when it is not a model in this process."""
        return None if self.teacher is None else self.teacher.model

    @property
    def teacher_cache(self):
        """The `TeacherCache` read in the teacher's place, or None."""
        return self.teacher.cache if self.teacher is not None and self.teacher.kind == "cache" else None

    @property
    def teacher_client(self):
        """The `TeacherClient` of a served teacher, or None."""
        return self.teacher.client if self.teacher is not None and self.teacher.kind == "url" else None

    # ----------------------------------------------------------------------------------------------------------------
    # Hooks

    def _checked_teacher_tokenizer(self, model, args, teacher, teacher_processing_class,
                                   student_tokenizer: PreTrainedTokenizerBase) -> tuple[PreTrainedTokenizerBase, bool]:
        """`(the teacher's tokenizer, whether the student's was assumed for it)`, checked against the student's; an
        assumed tokenizer also needs the two heads of one size (checked here for a student in memory)."""
        tokenizer = self._load_teacher_tokenizer(teacher, teacher_processing_class, args, student_tokenizer)
        # `load_teacher_tokenizer` returns the student's own object only when it assumed it.
        assumed = teacher_processing_class is None and tokenizer is student_tokenizer
        if assumed and self._compares_logits(args) and not isinstance(model, str):
            check_same_head_size(model, teacher)  # else checked in the set-up, once the student is loaded
        self._check_tokenizers(args, student_tokenizer, tokenizer, model_name(model), model_name(teacher))
        return tokenizer, assumed

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
        """The teacher, loaded from its name if need be (with `trust_remote_code` as for the student, as TRL's GKD
        does), with its adapter merged."""
        return load_model_teacher(teacher, args, args.teacher_adapter_name_or_path)

    def _attach_trainable_modules(self, teacher: PreTrainedModel) -> None:
        """Adds what the method trains beside the student's weights (DSKD's projectors) to the student; called with the
        loaded, frozen teacher. Vanilla KD adds nothing."""
