"""A teacher in memory: a model (or its name) loaded beside the student, adapter merged, frozen, checked against the
student's head and tokenizer, and prepared by accelerate or DeepSpeed; each batch runs its forward under no_grad and
hands the engine its hidden states and head."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel
from trl.models import prepare_deepspeed

from ..models.hidden_states import last_hidden_state
from ..losses import DenseMember, LogitTransform
from .base import Teacher, register_teacher_kind
from .loading import check_same_head_size, freeze, load_teacher, model_name, output_head_shape


def teacher_init_kwargs(teacher, args) -> dict | None:
    """`teacher_model_init_kwargs`, with the student's `trust_remote_code` for a teacher loaded by name (as TRL's GKD
    loads its teacher)."""
    init_kwargs = args.teacher_model_init_kwargs
    if isinstance(teacher, str):
        init_kwargs = {"trust_remote_code": args.trust_remote_code, **(init_kwargs or {})}
    return init_kwargs


def load_model_teacher(teacher, args, adapter: str | None) -> PreTrainedModel:
    """The teacher loaded from its name if need be, with its adapter merged."""
    return load_teacher(teacher, teacher_init_kwargs(teacher, args), adapter)


def checked_heads(host, teacher: PreTrainedModel, tokenizer, assumes_student_tokenizer: bool, args) -> PreTrainedModel:
    """`teacher`, after checking its head against the student's (when the student's tokenizer was assumed for it) and
    both heads against their tokenizers."""
    if assumes_student_tokenizer and host._compares_logits(args):
        check_same_head_size(host.model, teacher)
    for role, head_model, role_tokenizer in (("student", host.model, host.processing_class),
                                             ("teacher", teacher, tokenizer)):
        rows = output_head_shape(head_model)[0]
        if rows < len(role_tokenizer):
            raise ValueError(
                f"The {role}'s output head has {rows} rows but its tokenizer has {len(role_tokenizer)} tokens. "
                f"Resize it: {role}.resize_token_embeddings(len(tokenizer))."
            )
    return teacher


def prepared(host, teacher: PreTrainedModel):
    """A loaded teacher prepared for training beside the student: by DeepSpeed (its inference engine) or by accelerate
    in evaluation mode."""
    if host.is_deepspeed_enabled:
        return prepare_deepspeed(teacher, host.accelerator)
    return host.accelerator.prepare_model(teacher, evaluation_mode=True)


@register_teacher_kind
class ResidentTeacher(Teacher):
    """A model in this process. `adapter`: a PEFT adapter merged into it when it is loaded (the config's
    `teacher_adapter_name_or_path` for a trainer's one teacher); `member`: the name of the teacher among several
    (`MixtureTeacher`), which is loaded with its own adapter, not through the method's hook."""

    kind = "model"

    def __init__(self, source, tokenizer, name, assumes_student_tokenizer=False, adapter: str | None = None,
                 member: str | None = None):
        super().__init__(source, tokenizer, name, assumes_student_tokenizer)
        self.adapter, self.member = adapter, member
        self.label = "teacher" if member is None else f"teacher {member}"
        self.wrapped, self.unwrapped, self._transform = None, None, LogitTransform()

    @classmethod
    def chosen_by(cls, args, entries) -> bool:
        # A teacher in memory unless the arguments name another kind.
        return not entries and getattr(args, "teacher_url", None) is None and \
            getattr(args, "teacher_cache", None) is None

    @classmethod
    def plan(cls, host, model, args, teacher_model, teacher_processing_class, student_tokenizer, entries=None):
        teacher = host._required_teacher(teacher_model, args)
        tokenizer, assumed = host._checked_teacher_tokenizer(model, args, teacher, teacher_processing_class,
                                                             student_tokenizer)
        return cls(teacher, tokenizer, model_name(teacher), assumed, adapter=args.teacher_adapter_name_or_path)

    def load(self, host, args) -> PreTrainedModel:
        """The teacher loaded (through the method's `_load_teacher_model`, which may reuse a teacher already loaded)
        and frozen, its head checked against the student's and both tokenizers."""
        loaded = host._load_teacher_model(self.source, args) if self.member is None else \
            load_model_teacher(self.source, args, self.adapter)
        return checked_heads(host, freeze(loaded), self.tokenizer, self.assumes_student_tokenizer, args)

    def set_up(self, host, args) -> None:
        teacher = self.load(host, args)
        host._attach_trainable_modules(teacher)  # before DeepSpeed partitions the teacher: both heads are whole
        self.wrapped, self.unwrapped = prepared(host, teacher), teacher
        self._transform = LogitTransform.from_config(teacher.config)

    @property
    def model(self):
        return self.wrapped

    @property
    def transform(self) -> LogitTransform:
        return self._transform

    def eval_(self) -> None:
        self.wrapped.eval()

    def head_checks(self, model_inputs: dict, vocab_size: int) -> list[tuple]:
        return [(self.label, self.wrapped, model_inputs, self._transform, vocab_size)]

    def hidden_states(self, host, model_inputs: dict) -> torch.Tensor:
        """`[B, T, D]` last hidden states of the teacher on `model_inputs`, under no_grad, through the wrapper's
        forward (so that DDP and DeepSpeed hooks fire)."""
        unwrapped = host.accelerator.unwrap_model(self.wrapped)
        with torch.no_grad():
            return host._forward_redirection(self.wrapped, unwrapped, last_hidden_state, unwrapped, model_inputs)

    def engine_source(self, host, inputs: dict, model_inputs: dict) -> DenseMember:
        unwrapped = host.accelerator.unwrap_model(self.wrapped)
        return DenseMember(self.hidden_states(host, model_inputs)[:, :-1], unwrapped.get_output_embeddings(),
                           self._transform)
