"""What every method that distils across two tokenizers shares: the teacher's tokenizer, and each example tokenized
once per tokenizer (`kd_trainers.data.dual_tokenization`) with, for the methods that pair positions, the aligned
groups of the two completions, or MinED's edit-distance partners; and the on-policy option (`lmbda`): a share of the
batches completed by the student and tokenized twice again. DSKD (cross-model attention or exact alignment), ULD,
GOLD and MinED build on it; a method switches it on with `_tokenizes_twice`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import warnings
from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl.models.utils import unwrap_model_for_generation

from ..data.dual_tokenization import (
    GROUP_COLUMNS, PARTNER_COLUMN, POSITION_COLUMNS, PROMPT_COLUMN, DualTokenizationCollator, DualTokenizer,
    with_completion)
from ..models.generation import generate_predictions
from ..models.tokenizer import load_tokenizer
from ..runtime.checks import is_positive_integer
from ..teacher_cache.cache import tokenizer_fingerprint
from ..teachers.loading import model_name

TEACHER_COLUMNS = ("teacher_input_ids", "teacher_completion_mask")
TEACHER_BATCH_KEYS = ("teacher_labels", "teacher_input_ids", "teacher_attention_mask")
# Marks a batch of the student's own samples (set by the on-policy step, read by `compute_loss`).
SAMPLED = "student_sampled"
# The dual tokenization's other columns: per-token pairings and the kept prompt, never model inputs.
PAIRING_BATCH_KEYS = (*POSITION_COLUMNS, PROMPT_COLUMN, SAMPLED)


@dataclass
class TwoTokenizerFields:
    r"""The config fields of a method that tokenizes each example twice (`teacher_tokenizer_name_or_path` and
    `max_prompt_length` are documented on `DSKDConfig`), and its on-policy option:

    lmbda (`float`, *optional*, defaults to `0.0`):
        The probability that a micro-batch's completions are replaced by the student's own samples (GOLD's and
        DSKDv2's on-policy option; TRL's GOLD defaults to 0.5). 0: the dataset's completions only.
    max_completion_length (`int`, *optional*, defaults to `128`):
        Most tokens the student samples per completion.
    temperature (`float`, *optional*, defaults to `0.9`):
        Sampling temperature of the student's completions (not the loss's: that is `kd_temperature`).
    top_p (`float`, *optional*, defaults to `0.95`):
        Nucleus sampling of the student's completions.
    """

    teacher_tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "The teacher's tokenizer; defaults to the teacher's name or path."}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Prompt tokens kept per tokenizer when each example is tokenized twice."}
    )
    lmbda: float = field(
        default=0.0, metadata={"help": "Share of batches whose completions the student samples (on-policy), in [0, 1]; "
                               "0: the dataset's completions."}
    )
    max_completion_length: int = field(
        default=128, metadata={"help": "Most tokens the student samples per completion in an on-policy batch."}
    )
    temperature: float = field(
        default=0.9, metadata={"help": "Sampling temperature of the student's on-policy completions; > 0."}
    )
    top_p: float = field(
        default=0.95, metadata={"help": "Nucleus sampling of the student's on-policy completions, in (0, 1]."}
    )

    def _check_two_tokenizer_fields(self) -> None:
        if self.max_prompt_length is not None and not is_positive_integer(self.max_prompt_length):
            raise ValueError(f"max_prompt_length must be a positive integer or None, got {self.max_prompt_length!r}.")
        if not is_positive_integer(self.max_completion_length):
            raise ValueError(f"max_completion_length must be a positive integer, got {self.max_completion_length!r}.")
        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for name, valid, expected in (
                ("lmbda", number(self.lmbda) and 0 <= self.lmbda <= 1, "a number in [0, 1]"),
                ("temperature", number(self.temperature) and self.temperature > 0, "a finite number > 0"),
                ("top_p", number(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]")):
            if not valid:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}.")
        if self.lmbda > 0 and getattr(self, "kd_weight", None) == 0:
            raise ValueError(f"lmbda={self.lmbda} with kd_weight=0: the student's own samples are only distilled "
                             "(never imitated), and kd_weight=0 distils nothing. Set kd_weight > 0, or lmbda=0.")


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (as TRL does); padded positions never reach a loss."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError(f"The tokenizer {model_name(tokenizer)} has neither a pad nor an EOS token: set "
                         "tokenizer.pad_token before training.")
    return pad_id


class TwoTokenizationsMixin:
    """Trainer hooks (of `KDTrainer`) for data tokenized by both tokenizers: `_tokenizes_twice()` says whether this
    run does (DSKD: across vocabularies), `_aligns_tokens` whether the rows carry the aligned groups (ULD, GOLD,
    DSKD's exact token alignment), `_pairs_by_edit_distance` whether they carry MinED's partners.

    On-policy (`lmbda > 0`, GOLD's and DSKDv2's option): each micro-batch, with probability `lmbda`, is replaced
    before its label tokens are counted by the student's own completions of its prompts (sampled at `temperature`,
    `top_p`, at most `max_completion_length` tokens), each tokenized twice again as the dataset was, the teacher
    reading its own chat template around the same completion text. The student's sample is re-tokenized on its side
    too (its text, not the sampled ids: the two agree unless the sampler chose a non-canonical tokenization), and
    ends with the EOS text as the dataset's completions do. A sample is distilled, never imitated: the CE term reads
    the dataset's completions only, so a batch of samples takes w·s·KD of the method's loss (its student CE, the
    likelihood of its own sample, would reinforce whatever it sampled, empty answers included)."""

    _aligns_tokens = False
    _pairs_by_edit_distance = False

    def __init__(self, model, *positional, teacher_model=None, args=None, teacher_processing_class=None,
                 **sft_kwargs):
        # Trainer(student, teacher, args=...) as these methods are usually written, and Trainer(student, args, ...,
        # teacher_model=teacher) in KDTrainer's and SFTTrainer's order: a config in second place is the config.
        positional = list(positional)
        if positional and teacher_model is None and not isinstance(positional[0], TrainingArguments):
            teacher_model = positional.pop(0)
        if positional and args is None and isinstance(positional[0], TrainingArguments):
            args = positional.pop(0)
        args = self._as_kd_config(model, args)
        self._lmbda = args.lmbda  # read while the parent's __init__ prepares the datasets, before `self.args` exists
        super().__init__(model, args, *positional, teacher_model=teacher_model,
                         teacher_processing_class=teacher_processing_class, **sft_kwargs)
        self.teacher_vocab_size = len(self.teacher_processing_class)
        if self._on_policy() and not self._tokenizes_twice():
            raise ValueError(f"lmbda={self.args.lmbda} samples the student's completions and tokenizes them for both "
                             f"tokenizers, but {self._name} runs under one vocabulary here (both tokenizers are the "
                             "same): use method gkd for on-policy distillation under one vocabulary, or lmbda=0.")

    def _tokenizes_twice(self) -> bool:
        return True

    def _load_teacher_tokenizer(self, teacher, teacher_processing_class, args, student_tokenizer):
        if teacher_processing_class is None and args.teacher_tokenizer_name_or_path is not None:
            teacher_processing_class = load_tokenizer(args.teacher_tokenizer_name_or_path)
        return super()._load_teacher_tokenizer(teacher, teacher_processing_class, args, student_tokenizer)

    def _default_data_collator(self, processing_class, args):
        if not self._tokenizes_twice():
            return None
        return DualTokenizationCollator(pad_id(processing_class), pad_id(self.teacher_processing_class),
                                        pad_to_multiple_of=args.pad_to_multiple_of)

    def _teacher_columns(self) -> tuple[str, ...]:
        return (TEACHER_COLUMNS + (GROUP_COLUMNS if self._aligns_tokens else ())
                + ((PARTNER_COLUMN,) if self._pairs_by_edit_distance else ())
                + ((PROMPT_COLUMN,) if self._on_policy() else ()))

    def _on_policy(self) -> bool:
        return self._lmbda > 0

    def _dual_tokenizer(self, processing_class, args) -> DualTokenizer:
        """How this run tokenizes an example twice: the dataset's rows and the on-policy ones alike."""
        return DualTokenizer(processing_class, self.teacher_processing_class, max_length=args.max_length,
                             max_prompt_length=args.max_prompt_length, align=self._aligns_tokens,
                             edit_partners=self._pairs_by_edit_distance, keep_prompt=self._on_policy())

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if not self._tokenizes_twice():
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if formatting_func is not None:
            raise ValueError(f"formatting_func is not supported by {self._name} across tokenizers, which "
                             "tokenizes each example twice from its prompt/completion or messages columns.")
        columns = dataset.column_names
        if set(self._teacher_columns()) <= set(columns):
            return dataset
        if len(dataset) == 0:
            raise ValueError(f"The {dataset_name} dataset is empty.")
        tokenize = self._dual_tokenizer(processing_class, args)
        # The map's fingerprint named here: `datasets` would otherwise pickle both tokenizers to hash them (28 s for
        # Gemma 3's 262k-token vocabulary, for every split).
        fingerprint = hashlib.sha256("|".join(map(str, (
            getattr(dataset, "_fingerprint", None), tokenizer_fingerprint(processing_class),
            tokenizer_fingerprint(self.teacher_processing_class), args.max_length, args.max_prompt_length,
            self._aligns_tokens, self._pairs_by_edit_distance, self._on_policy(),
            "dskd-dual-tokenization-1"))).encode()).hexdigest()[:16]
        return dataset.map(tokenize, remove_columns=columns, new_fingerprint=fingerprint,
                           desc=f"Tokenizing {dataset_name} dataset for {self._name}")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._tokenizes_twice():
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, "completion_mask",
                                                          *self._teacher_columns()]))

    @staticmethod
    def _teacher_inputs(inputs: dict) -> dict:
        """The teacher's own tokenization of the batch."""
        return {"input_ids": inputs["teacher_input_ids"], "attention_mask": inputs["teacher_attention_mask"]}

    def _head_checks(self, model, inputs: dict) -> list[tuple]:
        checks = super()._head_checks(model, inputs)
        if self._tokenizes_twice() and len(checks) > 1:  # the teacher in memory reads its own tokenization
            checks[1] = ("teacher", self.teacher.model, self._teacher_inputs(inputs), self.teacher.transform,
                         self.teacher_vocab_size)
        return checks

    def kd_settings(self) -> dict[str, object]:
        settings = super().kd_settings()
        if self._on_policy():
            args = self.args
            settings.update(lmbda=args.lmbda, max_completion_length=args.max_completion_length,
                            sampling_temperature=args.temperature, top_p=args.top_p)
        return settings

    # ----------------------------------------------------------------------------------------------------------------
    # On-policy batches, replaced before their label tokens are counted

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The accumulation step's micro-batches, each replaced by the student's completions with probability
        `lmbda` (the draw is the same on every process: each seeds Python's `random` alike), then counted, so that the
        loss is divided by the tokens it covers."""
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not self._on_policy():
            return batch_samples, num_items
        batch_samples = [self._student_completed(batch) if random.random() < self.args.lmbda else batch
                         for batch in batch_samples]
        return batch_samples, self._get_num_items_in_batch(batch_samples, device)

    def _student_completed(self, batch: dict) -> dict:
        """`batch` with its completions the student's samples, tokenized twice as the dataset was."""
        args = self.args
        prompts = [json.loads(text) for text in batch[PROMPT_COLUMN]]
        with warnings.catch_warnings():
            # TRL's unwrapping still calls transformers' deprecated gradient-checkpointing names: not the user's to fix.
            warnings.filterwarnings("ignore", message=r"`\w+` is deprecated and will be removed in v6",
                                    category=FutureWarning)
            with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                             gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs
                                             ) as unwrapped:
                texts = generate_predictions(unwrapped, self.processing_class, prompts, batch_size=len(prompts),
                                             strip=False, progress=False, do_sample=True,
                                             temperature=args.temperature, top_p=args.top_p,
                                             max_new_tokens=args.max_completion_length)
                unwrapped.train()  # generation left it in eval mode; the step trains with dropout as configured
        tokenize = self._dual_tokenizer(self.processing_class, args)
        batch = self.data_collator([tokenize(with_completion(prompt, text)) for prompt, text in zip(prompts, texts)])
        return {**batch, SAMPLED: True}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """A batch of the student's own samples: the method's loss at kd_weight 1 (no student CE), times w."""
        if not inputs.get(SAMPLED):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._distilling_a_sample = True
        try:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            self._distilling_a_sample = False
        weight = self.args.kd_weight
        return (weight * result[0], *result[1:]) if return_outputs else weight * result

    def _settings_for(self, mode: str):
        settings = super()._settings_for(mode)
        if getattr(self, "_distilling_a_sample", False):
            return dataclasses.replace(settings, kd_weight=1.0)
        return settings
