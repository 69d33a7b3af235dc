"""`KDTrainer`: logit knowledge distillation as a drop-in replacement for TRL's `SFTTrainer`."""

from __future__ import annotations

import inspect
import textwrap

from transformers import PreTrainedModel, TrainingArguments
from trl import SFTTrainer

from ..runtime.checkpointing import AtomicCheckpointMixin
from ..runtime.guards import RunGuardsMixin
from ..teachers.entries import teacher_entries
from ..teachers.loading import load_student_tokenizer
from .config import KDConfig
from .loss_mixin import DistillationLossMixin
from .prompt_rows import PromptRowsMixin
from .teacher_setup import TeacherSetupMixin


# SFTTrainer's parameters after (self, model, args), in order.
_SFT_POSITIONAL_NAMES = list(inspect.signature(SFTTrainer.__init__).parameters)[3:]


class KDTrainer(RunGuardsMixin, AtomicCheckpointMixin, PromptRowsMixin, TeacherSetupMixin, DistillationLossMixin,
                SFTTrainer):
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
        teacher_cache: a folder of the teacher's cached sparse targets, in place of a teacher in memory
            (`KDConfig.teacher_cache`).
        teacher_url: a vLLM-compatible server of the teacher's top-k log-probabilities, `http://HOST:PORT/v1`, in
            place of a teacher in memory (`KDConfig.teacher_url`).
        teacher_models: several teachers at once, each a model (or its name), or `{model | cache | url: ...,
            weight: 1.0, name: ..., adapter: ...}` (`kd_trainers.teachers.entries`): per token the target is the
            weighted mixture of their distributions, or, with `args.teacher_column`, the distribution of the one
            teacher each example's column names. The logs carry each teacher's `kd_loss_<name>`.
        Every other argument is `SFTTrainer`'s.

    The loss is computed from both models' last hidden states and output heads, in chunks of label tokens
    (`kd_trainers.losses.chunked_distillation_loss`), so neither model's `[B, T, V]` logits are ever held. The logs
    carry `ce_loss`, `kd_loss` and `mean_token_accuracy` beside `loss`.

    Example (the demo's tiny models; any causal LM and SFT dataset in their place):

        >>> import tempfile
        >>> from kd_trainers import KDConfig, KDTrainer
        >>> from kd_trainers.demo import demo_model, demo_tokenizer, load_demo_dataset
        >>> tokenizer = demo_tokenizer("bpe")
        >>> teacher, student = demo_model("llama", tokenizer, "teacher"), demo_model("llama", tokenizer, "student")
        >>> args = KDConfig(output_dir=tempfile.mkdtemp(), kd_temperature=2.0, kd_weight=0.5, max_steps=2,
        ...                 per_device_train_batch_size=4, report_to=[], save_strategy="no", bf16=False)
        >>> trainer = KDTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
        ...                     train_dataset=load_demo_dataset()["train"].select(range(8)))
        >>> trainer.train().global_step   # the trainer prints the run's metrics, then
        {'train_runtime': ..., 'ce_loss': ..., 'kd_loss': ..., ...}
        2
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
                 teacher_model: PreTrainedModel | str | None = None, teacher_processing_class=None,
                 teacher_cache: str | None = None, teacher_url: str | None = None, teacher_models: list | None = None,
                 prompt_dataset=None, **sft_kwargs):
        args = self._with_teacher_source(self._as_kd_config(model, args), teacher_cache=teacher_cache,
                                         teacher_url=teacher_url)
        # Positional arguments after `args` mean what they mean to SFTTrainer (data_collator, train_dataset, ...).
        sft_kwargs.update(zip(_SFT_POSITIONAL_NAMES, sft_args))
        self._teacher_entries = None if teacher_models is None else teacher_entries(teacher_models)
        self._refuse_compute_loss_func(args, sft_kwargs.get("compute_loss_func"))
        self._check_training_rows(args, sft_kwargs.get("train_dataset"), prompt_dataset)  # before anything loads
        if sft_kwargs.get("processing_class") is None:
            sft_kwargs["processing_class"] = load_student_tokenizer(model)
        # Tokenizers first: a vocabulary mismatch must fail before the dataset is tokenized or the teacher loaded.
        plan = self._plan_teacher(model, args, teacher_model, teacher_processing_class, sft_kwargs["processing_class"])
        sft_kwargs = self._prepare_training_data(plan, args, sft_kwargs, prompt_dataset)
        if sft_kwargs.get("data_collator") is None:
            sft_kwargs["data_collator"] = self._default_data_collator(sft_kwargs["processing_class"], args)
        super().__init__(model, args, **sft_kwargs)
        self._set_up_teacher(plan, args)
        self._init_distillation(args)

    _config_class = KDConfig

    def _default_data_collator(self, processing_class, args):
        """None: SFTTrainer's own collator. A subclass with other batches (DSKD's two tokenizations) returns its own."""
        return None
