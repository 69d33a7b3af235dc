"""What every method that distils across two tokenizers shares: the teacher's tokenizer, and each example tokenized
once per tokenizer (`kd_trainers.data.dual_tokenization`) with, for the methods that pair positions, the aligned
groups of the two completions, or MinED's edit-distance partners. DSKD (cross-model attention or exact alignment),
ULD, GOLD and MinED build on it; a method switches it on with `_tokenizes_twice`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..data.dual_tokenization import GROUP_COLUMNS, PARTNER_COLUMN, DualTokenizationCollator, DualTokenizer
from ..models.tokenizer import load_tokenizer
from ..runtime.checks import is_positive_integer
from ..teacher_cache.cache import tokenizer_fingerprint
from ..teachers.loading import model_name

TEACHER_COLUMNS = ("teacher_input_ids", "teacher_completion_mask")
TEACHER_BATCH_KEYS = ("teacher_labels", "teacher_input_ids", "teacher_attention_mask")
POSITION_BATCH_KEYS = (*GROUP_COLUMNS, PARTNER_COLUMN)  # per-token pairing columns, never model inputs


@dataclass
class TwoTokenizerFields:
    """The config fields of a method that tokenizes each example twice (documented on `DSKDConfig`)."""

    teacher_tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "The teacher's tokenizer; defaults to the teacher's name or path."}
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Prompt tokens kept per tokenizer when each example is tokenized twice."}
    )

    def _check_two_tokenizer_fields(self) -> None:
        if self.max_prompt_length is not None and not is_positive_integer(self.max_prompt_length):
            raise ValueError(f"max_prompt_length must be a positive integer or None, got {self.max_prompt_length!r}.")


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
    DSKD's exact token alignment), `_pairs_by_edit_distance` whether they carry MinED's partners."""

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
        super().__init__(model, args, *positional, teacher_model=teacher_model,
                         teacher_processing_class=teacher_processing_class, **sft_kwargs)
        self.teacher_vocab_size = len(self.teacher_processing_class)

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
                + ((PARTNER_COLUMN,) if self._pairs_by_edit_distance else ()))

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
        tokenize = DualTokenizer(processing_class, self.teacher_processing_class, max_length=args.max_length,
                                 max_prompt_length=args.max_prompt_length, align=self._aligns_tokens,
                                 edit_partners=self._pairs_by_edit_distance)
        # The map's fingerprint named here: `datasets` would otherwise pickle both tokenizers to hash them (28 s for
        # Gemma 3's 262k-token vocabulary, for every split).
        fingerprint = hashlib.sha256("|".join(map(str, (
            getattr(dataset, "_fingerprint", None), tokenizer_fingerprint(processing_class),
            tokenizer_fingerprint(self.teacher_processing_class), args.max_length, args.max_prompt_length,
            self._aligns_tokens, self._pairs_by_edit_distance, "dskd-dual-tokenization-1"))).encode()).hexdigest()[:16]
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
        if self._tokenizes_twice():  # the teacher reads its own tokenization, in its own vocabulary
            checks[1] = ("teacher", self.teacher.model, self._teacher_inputs(inputs), self.teacher.transform,
                         self.teacher_vocab_size)
        return checks
