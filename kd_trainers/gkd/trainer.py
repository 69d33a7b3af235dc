"""`GKDTrainer`: TRL's on-policy GKD with the package's loss (divergences, temperature, CE mixing, noise, chunks)."""

from __future__ import annotations

import random
import textwrap

from transformers import AutoTokenizer
from trl import SFTTrainer
from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer
from trl.models.utils import unwrap_model_for_generation

from ..checkpointing import AtomicCheckpointMixin
from ..guards import RunGuardsMixin
from ..kd.loss_mixin import DistillationLossMixin
from ..teacher import (check_same_head_size, check_same_vocabulary, freeze, load_teacher, load_teacher_tokenizer,
                       model_name)
from .config import GKDConfig
from .data import PromptCompletionCollator


class GKDTrainer(RunGuardsMixin, AtomicCheckpointMixin, DistillationLossMixin, TRLGKDTrainer):
    """Generalized knowledge distillation (Agarwal et al., 2024) on top of `trl.experimental.gkd.GKDTrainer`.

    TRL's training step is kept as it is: with probability `lmbda` the batch's completions are replaced by the
    student's own samples (on-policy), else by the teacher's when `seq_kd`, else the dataset's are used. The loss is
    the package's: `(1 − kd_weight)·CE + kd_weight·KD` with any of `kd_trainers.DIVERGENCES` at `kd_temperature`,
    teacher-logit noise, and the chunked engine (no `[B, T, V]` logits held). With `GKDConfig`'s defaults it equals
    TRL's own GKD loss (tested).

    Takes TRL's `GKDTrainer` arguments in TRL's order (`model, teacher_model, args, ...`), plus
    `teacher_processing_class`. The data may be prompt/completion or messages; it is tokenized per batch by
    `PromptCompletionCollator` unless a `data_collator` is given.
    """

    _tag_names = ["trl", "gkd", "kd_trainers", "knowledge-distillation"]
    _name = "GKD"
    _paper = {
        "title": "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes",
        "id": "2306.13649",
        "citation": textwrap.dedent("""\
            @inproceedings{agarwal2024on-policy,
                title        = {{On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes}},
                author       = {Rishabh Agarwal and Nino Vieillard and Yongchao Zhou and Piotr Stanczyk and Sabela Ramos Garea and Matthieu Geist and Olivier Bachem},
                year         = 2024,
                booktitle    = {The Twelfth International Conference on Learning Representations, {ICLR} 2024},
            }"""),
    }
    # Batch keys that are not model inputs: the prompts are only for generating on-policy completions.
    _non_model_keys = ("labels", "prompts", "prompt_attention_mask")

    def __init__(self, model=None, teacher_model=None, args: GKDConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, *trl_args,
                 teacher_processing_class=None, **trl_kwargs):
        if args is None:
            args = GKDConfig(output_dir=f"{model_name(model).split('/')[-1].strip('<>')}-GKD")
        elif not isinstance(args, GKDConfig):
            args = GKDConfig.from_sft_config(args)
        teacher = self._required_teacher(teacher_model, args)
        self._refuse_compute_loss_func(args, trl_kwargs.get("compute_loss_func"))
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model_name(model))
        # TRL's GKD script passes the teacher as a model and no teacher tokenizer: the student's is then assumed
        # (with a warning) for a teacher that has none of its own, as TRL does, after checking what can be checked.
        self.teacher_processing_class = load_teacher_tokenizer(teacher, teacher_processing_class, processing_class)
        assumed = teacher_processing_class is None and self.teacher_processing_class is processing_class
        if assumed and not isinstance(model, str):
            check_same_head_size(model, teacher)
        check_same_vocabulary(processing_class, self.teacher_processing_class, model_name(model), model_name(teacher))
        if data_collator is None:
            data_collator = PromptCompletionCollator(processing_class, args.max_length)
        self.teacher_name = model_name(teacher)
        loaded = freeze(load_teacher(teacher, args.teacher_model_init_kwargs, args.teacher_adapter_name_or_path))
        # TRL refuses init kwargs with a teacher object; they have been applied above.
        init_kwargs, args.teacher_model_init_kwargs = args.teacher_model_init_kwargs, None
        try:
            super().__init__(model, loaded, args, data_collator, train_dataset, eval_dataset, processing_class,
                             *trl_args, **trl_kwargs)
        finally:
            args.teacher_model_init_kwargs = init_kwargs
        if assumed and isinstance(model, str):
            check_same_head_size(self.model, loaded)
        self._init_distillation(args, loaded)

    # ----------------------------------------------------------------------------------------------------------------
    # On-policy batches, counted after generation

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The accumulation step's micro-batches, with their completions replaced as TRL's GKD replaces them (the
        student's samples with probability `lmbda`, else the teacher's when `seq_kd`), *before* the label tokens are
        counted: the loss is then divided by the tokens it covers, not by the dataset's completion lengths (TRL's
        `training_step` replaces them after `Trainer` has counted)."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        batch_samples = [self._replace_completions(batch) for batch in batch_samples]
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)

    def _replace_completions(self, inputs: dict) -> dict:
        if random.random() <= self.lmbda:
            generator, extra = self.model_wrapped, {"gradient_checkpointing_kwargs":
                                                    self.args.gradient_checkpointing_kwargs}
        elif self.seq_kd:
            generator, extra = self.teacher_model, {}
        else:
            return inputs
        with unwrap_model_for_generation(generator, self.accelerator, generation_kwargs=self.generation_kwargs,
                                         **extra) as unwrapped:
            input_ids, attention_mask, labels = self.generate_on_policy_outputs(unwrapped, inputs,
                                                                                self.generation_config)
        return {**inputs, "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The completions were replaced in `get_batch_samples`; TRL's own step would replace them a second time.
        return self._note_loss(SFTTrainer.training_step(self, model, inputs, num_items_in_batch))

    def kd_settings(self) -> dict[str, object]:
        settings = super().kd_settings()
        settings.update(method="GKD (on-policy)", lmbda=self.args.lmbda, seq_kd=self.args.seq_kd,
                        sampling_temperature=self.args.temperature, max_new_tokens=self.args.max_new_tokens)
        return settings
