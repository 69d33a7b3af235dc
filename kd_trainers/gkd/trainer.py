"""`GKDTrainer`: TRL's on-policy GKD with the package's loss (divergences, temperature, CE mixing, noise, chunks)."""

from __future__ import annotations

import warnings
import inspect
import random
import textwrap

from transformers import GenerationConfig
from trl import SFTTrainer
from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import disable_dropout_in_model

from ..runtime.checkpointing import AtomicCheckpointMixin
from ..runtime.guards import RunGuardsMixin
from ..kd.loss_mixin import DistillationLossMixin
from ..kd.teacher_setup import TeacherSetupMixin
from ..data.prompt_completion import require_labels
from ..teachers.loading import load_student_tokenizer
from .config import GKDConfig
from .data import PromptCompletionCollator


# TRL GKDTrainer's parameters after (self, model, teacher_model, args, data_collator, train_dataset, eval_dataset,
# processing_class), in order.
_TRL_GKD_POSITIONAL_NAMES = list(inspect.signature(TRLGKDTrainer.__init__).parameters)[8:]


class GKDTrainer(RunGuardsMixin, AtomicCheckpointMixin, TeacherSetupMixin, DistillationLossMixin, TRLGKDTrainer):
    """Generalized knowledge distillation (Agarwal et al., 2024) on top of `trl.experimental.gkd.GKDTrainer`.

    TRL's training step is kept as it is: with probability `lmbda` the batch's completions are replaced by the
    student's own samples (on-policy), else by the teacher's when `seq_kd`, else the dataset's are used. The loss is
    the package's: `(1 − kd_weight)·CE + kd_weight·KD` with any of `kd_trainers.DIVERGENCES` at `kd_temperature`,
    teacher-logit noise, and the chunked engine (no `[B, T, V]` logits held). With `GKDConfig`'s defaults it equals
    TRL's own GKD loss (tested).

    Takes TRL's `GKDTrainer` arguments in TRL's order (`model, teacher_model, args, ...`), plus
    `teacher_processing_class`. The data may be prompt/completion or messages, or prompts alone at `lmbda=1` (or
    with `seq_kd`), where no batch reads a label; it is tokenized per batch by `PromptCompletionCollator` unless a
    `data_collator` is given.

    Example (on-policy: every batch is the student's own samples, `lmbda=1`):

        >>> import tempfile
        >>> from kd_trainers import GKDConfig, GKDTrainer
        >>> from kd_trainers.demo import demo_model, demo_tokenizer, load_demo_dataset
        >>> tokenizer = demo_tokenizer("bpe")
        >>> teacher, student = demo_model("llama", tokenizer, "teacher"), demo_model("llama", tokenizer, "student")
        >>> args = GKDConfig(output_dir=tempfile.mkdtemp(), lmbda=1.0, max_new_tokens=8, max_steps=2,
        ...                  per_device_train_batch_size=4, report_to=[], save_strategy="no", bf16=False)
        >>> trainer = GKDTrainer(student, teacher, args=args, processing_class=tokenizer,
        ...                      train_dataset=load_demo_dataset()["train"].select(range(8)))
        >>> trainer.train().global_step   # the trainer prints the run's metrics, then
        {'train_runtime': ..., 'ce_loss': ..., 'kd_loss': ..., ...}
        2
    """

    _tag_names = ["trl", "gkd", "kd_trainers", "knowledge-distillation"]
    _name = "GKD"
    _config_class = GKDConfig
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
        args = self._as_kd_config(model, args)
        # Positional arguments after `processing_class` mean what they mean to TRL's GKDTrainer.
        trl_kwargs.update(zip(_TRL_GKD_POSITIONAL_NAMES, trl_args))
        self._refuse_compute_loss_func(args, trl_kwargs.get("compute_loss_func"))
        if self.reads_labels(args):  # before anything loads
            require_labels(train_dataset, f"GKD at lmbda={args.lmbda} (off-policy batches)")
        if processing_class is None:
            processing_class = load_student_tokenizer(model)
        # TRL's GKD script passes the teacher as a model and no teacher tokenizer: the student's is then assumed
        # (with a warning) for a teacher that has none of its own, as TRL does, after checking what can be checked.
        plan = self._plan_teacher(model, args, teacher_model, teacher_processing_class, processing_class)
        if data_collator is None:
            data_collator = PromptCompletionCollator(processing_class, args.max_length)
        # As TRL's GKDTrainer: the collator tokenizes the raw prompt/completion or messages columns per batch.
        args.remove_unused_columns = False
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        # TRL's GKDTrainer.__init__ is not called: it would load and prepare the teacher a second way. Its methods
        # (`generate_on_policy_outputs`) are used as they are, with the state it sets up (`_init_on_policy`).
        SFTTrainer.__init__(self, model, args, data_collator, train_dataset, eval_dataset, processing_class,
                            **trl_kwargs)
        self._set_up_teacher(plan, args)
        if args.disable_dropout:
            disable_dropout_in_model(self.model)
        self._init_on_policy(args)
        self._init_distillation(args)

    @classmethod
    def reads_labels(cls, args) -> bool:
        """At `lmbda=1` every batch's completions are the student's samples, and with `seq_kd` the off-policy ones
        are the teacher's: the dataset's completions are then never read, and prompts alone are data."""
        return args.lmbda < 1 and not args.seq_kd

    def _init_on_policy(self, args: GKDConfig) -> None:
        """What TRL's `GKDTrainer` keeps for its on-policy step: λ, β, the sampling temperature, `seq_kd`, and the
        sampling settings of generation (pure sampling at `temperature`, at most `max_new_tokens`, ending on the
        student's end-of-turn tokens)."""
        self.lmbda, self.beta, self.temperature, self.seq_kd = args.lmbda, args.beta, args.temperature, args.seq_kd
        self.generation_kwargs = {
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "do_sample": True, "top_k": 0,
            # The KV cache even under gradient checkpointing, as TRL's DistillationTrainer: the student generates
            # unwrapped for generation (`_replace_completions`), which turns checkpointing off until it is done.
            "top_p": 1.0, "use_cache": True,
            "pad_token_id": self.processing_class.pad_token_id,
        }
        self.generation_config = GenerationConfig(**self.generation_kwargs)
        eos_token_id = getattr(self.model.generation_config, "eos_token_id", None)
        if eos_token_id is not None:  # e.g. Llama 3's <|eot_id|> and <|eom_id|>
            self.generation_config.eos_token_id = eos_token_id

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
            generator, extra = self.teacher.model, {}
        else:
            return inputs
        with warnings.catch_warnings():
            # TRL's unwrapping still calls transformers' deprecated gradient-checkpointing names: not the user's to fix.
            warnings.filterwarnings("ignore", message=r"`\w+` is deprecated and will be removed in v6",
                                    category=FutureWarning)
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
