"""`KDTrainer`: logit knowledge distillation as a drop-in replacement for TRL's `SFTTrainer`."""

from __future__ import annotations

import inspect
import textwrap

from transformers import AutoTokenizer, PreTrainedModel, TrainingArguments
from trl import SFTTrainer
from trl.models import prepare_deepspeed

from ..checkpointing import AtomicCheckpointMixin
from ..guards import RunGuardsMixin
from ..teacher import (check_same_head_size, check_same_vocabulary, freeze, load_teacher, load_teacher_tokenizer,
                       model_name, output_head_shape)
from .config import KDConfig
from .loss_mixin import DistillationLossMixin


# SFTTrainer's parameters after (self, model, args), in order.
_SFT_POSITIONAL_NAMES = list(inspect.signature(SFTTrainer.__init__).parameters)[3:]


class KDTrainer(RunGuardsMixin, AtomicCheckpointMixin, DistillationLossMixin, SFTTrainer):
    """Knowledge distillation from a frozen teacher into the student, on top of TRL's `SFTTrainer`.

    Takes exactly `SFTTrainer`'s arguments, in the same order, plus the teacher: switching a TRL script from
    `SFTTrainer` to `KDTrainer` is changing the import and passing `teacher_model=`. Every SFT dataset format, PEFT,
    packing, gradient accumulation and evaluation work as in `SFTTrainer`.

    Args:
        model: the student, as in `SFTTrainer`.
        args: a `KDConfig` (an `SFTConfig` is accepted and converted with the KD defaults).
        teacher_model: the teacher, a model or a Hub id / local path; defaults to `args.teacher_model_name_or_path`.
            It is frozen, kept in eval mode, and never given to the optimizer.
        teacher_processing_class: the teacher's tokenizer; by default loaded from the teacher's name or path. It must
            map every token to the same id as the student's, else a clear error points to DSKD.
        Every other argument is `SFTTrainer`'s.

    The loss is computed from both models' last hidden states and output heads, in chunks of label tokens
    (`kd_trainers.losses.chunked_distillation_loss`), so neither model's `[B, T, V]` logits are ever held. The logs
    carry `ce_loss`, `kd_loss` and `mean_token_accuracy` beside `loss`.
    """

    _tag_names = ["trl", "sft", "kd_trainers", "knowledge-distillation"]
    _name = "KD"
    _paper = {
        "title": "Distilling the Knowledge in a Neural Network",
        "id": "1503.02531",
        "citation": textwrap.dedent("""\
            @article{hinton2015distilling,
                title        = {{Distilling the Knowledge in a Neural Network}},
                author       = {Geoffrey Hinton and Oriol Vinyals and Jeff Dean},
                year         = 2015,
                journal      = {arXiv preprint arXiv:1503.02531},
            }"""),
    }

    def __init__(self, model, args: KDConfig | TrainingArguments | None = None, *sft_args,
                 teacher_model: PreTrainedModel | str | None = None, teacher_processing_class=None, **sft_kwargs):
        args = self._as_kd_config(model, args)
        teacher = self._required_teacher(teacher_model, args)

        # Positional arguments after `args` mean what they mean to SFTTrainer (data_collator, train_dataset, ...).
        sft_kwargs.update(zip(_SFT_POSITIONAL_NAMES, sft_args))
        self._refuse_compute_loss_func(args, sft_kwargs.get("compute_loss_func"))
        # Tokenizers first: a vocabulary mismatch must fail before the dataset is tokenized or the teacher loaded.
        if sft_kwargs.get("processing_class") is None:
            sft_kwargs["processing_class"] = AutoTokenizer.from_pretrained(model_name(model))
        processing_class = sft_kwargs["processing_class"]
        self.teacher_processing_class = self._load_teacher_tokenizer(teacher, teacher_processing_class, args,
                                                                     processing_class)
        # A teacher that came without a tokenizer is assumed to use the student's (as TRL assumes): then the heads
        # must have the same size, checked now when the student is an object, else once SFTTrainer has loaded it.
        # (`load_teacher_tokenizer` returns the student's own object only when it assumed it.)
        assumed = teacher_processing_class is None and self.teacher_processing_class is processing_class
        if assumed and not isinstance(model, str):
            check_same_head_size(model, teacher)
        self._check_tokenizers(args, processing_class, self.teacher_processing_class, model_name(model),
                               model_name(teacher))
        if sft_kwargs.get("data_collator") is None:
            sft_kwargs["data_collator"] = self._default_data_collator(processing_class, args)

        super().__init__(model, args, **sft_kwargs)

        teacher = freeze(self._load_teacher_model(teacher, args))
        if assumed:
            check_same_head_size(self.model, teacher)
        for role, head_model, tokenizer in (("student", self.model, processing_class),
                                            ("teacher", teacher, self.teacher_processing_class)):
            rows = output_head_shape(head_model)[0]
            if rows < len(tokenizer):
                raise ValueError(
                    f"The {role}'s output head has {rows} rows but its tokenizer has {len(tokenizer)} tokens. "
                    f"Resize it: {role}.resize_token_embeddings(len(tokenizer))."
                )
        self.teacher_name = model_name(teacher_model if teacher_model is not None else teacher)
        self._attach_trainable_modules(teacher)
        if self.is_deepspeed_enabled:
            self.teacher_model = prepare_deepspeed(teacher, self.accelerator)
        else:
            self.teacher_model = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self._init_distillation(args, teacher)

    _config_class = KDConfig

    @classmethod
    def _as_kd_config(cls, model, args) -> KDConfig:
        if isinstance(args, cls._config_class):
            return args
        if args is None:
            name = model_name(model).split("/")[-1].lstrip("<").rstrip(">")
            return cls._config_class(output_dir=f"{name}-{cls._name}")
        return cls._config_class.from_sft_config(args)

    def _load_teacher_model(self, teacher, args) -> PreTrainedModel:
        """The teacher, loaded from its name if need be, with its adapter merged (Seq-KD has loaded it already)."""
        return load_teacher(teacher, args.teacher_model_init_kwargs, args.teacher_adapter_name_or_path)

    def _load_teacher_tokenizer(self, teacher, teacher_processing_class, args, student_tokenizer):
        return load_teacher_tokenizer(teacher, teacher_processing_class, student_tokenizer)

    def _attach_trainable_modules(self, teacher: PreTrainedModel) -> None:
        """Adds what the method trains beside the student's weights (DSKD's projectors) to the student; called with the
        loaded, frozen teacher before DeepSpeed partitions it (both heads are whole here). Vanilla KD adds nothing."""

    def _default_data_collator(self, processing_class, args):
        """None: SFTTrainer's own collator. A subclass with other batches (DSKD's two tokenizations) returns its own."""
        return None

    def _check_tokenizers(self, args, student_tokenizer, teacher_tokenizer, student_name: str,
                          teacher_name: str) -> None:
        """Vanilla KD compares the two distributions id by id: the vocabularies must be the same."""
        check_same_vocabulary(student_tokenizer, teacher_tokenizer, student_name, teacher_name)
