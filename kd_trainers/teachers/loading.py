"""The teacher side shared by every trainer: loading, adapters, freezing, and the tokenizer check.

Kept out of the trainers so that KD, DSKD and GKD treat a teacher the same way.
"""

from __future__ import annotations

import warnings

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from ..models.tokenizer import load_tokenizer


def model_name(model) -> str:
    """A readable name for a model (or tokenizer) given as a name, a path, or an object."""
    if isinstance(model, str):
        return model
    model = getattr(model, "get_base_model", lambda: model)()
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "") or ""
    return name or f"<in-memory {type(model).__name__}>"


def load_student_tokenizer(model):
    """The tokenizer of a student given without `processing_class`: loaded from its name or path, as TRL's
    SFTTrainer does; a model built in memory has none to load, and the error says what to pass."""
    name = model_name(model)
    if name.startswith("<in-memory "):
        raise ValueError(f"processing_class is missing: the student {name} was built in memory, so there is no name "
                         "or path to load its tokenizer from. Pass processing_class=<the student's tokenizer>.")
    try:
        return load_tokenizer(name)
    except (OSError, ValueError) as error:
        raise ValueError(f"processing_class is missing, and the student's tokenizer does not load from {name!r} "
                         f"({' '.join(str(error).split())[:200]}). Pass processing_class=<the student's "
                         "tokenizer>.") from None


def dtype_from_init_kwargs(init_kwargs: dict) -> dict:
    init_kwargs = dict(init_kwargs)
    dtype = init_kwargs.get("dtype", init_kwargs.pop("torch_dtype", None))
    if isinstance(dtype, str) and dtype != "auto":
        init_kwargs["dtype"] = getattr(torch, dtype)
    elif dtype is not None:
        init_kwargs["dtype"] = dtype
    return init_kwargs


def load_teacher(teacher: str | PreTrainedModel, init_kwargs: dict | None = None,
                 adapter_name_or_path: str | None = None) -> PreTrainedModel:
    """The teacher model: loaded when given by name, with a PEFT adapter merged in when one is named."""
    if isinstance(teacher, str):
        teacher = AutoModelForCausalLM.from_pretrained(teacher, **dtype_from_init_kwargs(init_kwargs or {}))
    elif init_kwargs:
        raise ValueError(
            "teacher_model_init_kwargs only apply when the teacher is loaded from a name or path, but the teacher "
            f"passed is already a model ({model_name(teacher)}). Drop teacher_model_init_kwargs, or pass the name."
        )
    if adapter_name_or_path is not None:
        # Merged: the frozen teacher then runs at the speed of a plain model, and no adapter can be trained by mistake.
        teacher = PeftModel.from_pretrained(teacher, adapter_name_or_path).merge_and_unload()
    return teacher


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """No gradients and eval mode (no dropout): the teacher is a fixed target."""
    model.requires_grad_(False)
    return model.eval()


def load_teacher_tokenizer(teacher: str | PreTrainedModel, teacher_processing_class=None,
                           student_tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedTokenizerBase:
    """The teacher's tokenizer: the one given, else the one stored beside the teacher's name or path.

    A teacher passed as a model object that has no tokenizer to load (built in memory, or saved without one) is
    assumed to use `student_tokenizer`, as TRL's trainers assume, when one is given: after checking what can be
    checked (`check_assumed_tokenizer`), with one warning line that says so. Without `student_tokenizer`, or for a
    teacher given by name, a missing tokenizer is an error.
    """
    if teacher_processing_class is not None:
        return teacher_processing_class
    name = teacher if isinstance(teacher, str) else getattr(getattr(teacher, "config", None), "_name_or_path", "")
    problem = "it was built in memory, with no name or path to load one from"
    if name:
        try:
            return load_tokenizer(name)
        except (OSError, ValueError) as error:
            if isinstance(teacher, str) or student_tokenizer is None:
                raise ValueError(
                    f"Could not load the teacher's tokenizer from {name!r} ({error}). "
                    "Pass teacher_processing_class=<the teacher's tokenizer>."
                ) from error
            problem = f"none could be loaded from {name!r}"
    if student_tokenizer is None:
        raise ValueError(
            f"Cannot tell which tokenizer the teacher {model_name(teacher)} uses: {problem}. "
            "Pass teacher_processing_class=<the teacher's tokenizer>."
        )
    check_assumed_tokenizer(teacher, student_tokenizer)
    warnings.warn(
        f"The teacher {model_name(teacher)} came without a tokenizer ({problem}): assuming it uses the student's "
        f"({model_name(student_tokenizer)}, {len(student_tokenizer)} tokens), as TRL does; its special-token ids and "
        "head size agree with that. Pass teacher_processing_class= to say otherwise.", AssumedTeacherTokenizer,
        stacklevel=3,
    )
    return student_tokenizer


class AssumedTeacherTokenizer(UserWarning):
    """The teacher came without a tokenizer and the student's is used for it."""


SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


def check_assumed_tokenizer(teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """What can be checked of a teacher assumed to use `tokenizer`: its head has a row for every token, and its
    config's special-token ids (where it sets them) are the tokenizer's."""
    rows = output_head_shape(teacher)[0]
    if rows < len(tokenizer):
        raise ValueError(
            f"The teacher {model_name(teacher)} came without a tokenizer, and its output head has {rows} rows, fewer "
            f"than the student's tokenizer's {len(tokenizer)} tokens: it cannot use the student's vocabulary. Pass "
            "teacher_processing_class=<the teacher's tokenizer>; for a teacher with another vocabulary use "
            "kd_trainers.DSKDTrainer, which distils across vocabularies."
        )
    config = teacher.config.get_text_config() if hasattr(teacher.config, "get_text_config") else teacher.config
    for name in SPECIAL_TOKENS:
        teacher_id, tokenizer_id = getattr(config, name, None), getattr(tokenizer, name, None)
        if teacher_id is None or tokenizer_id is None:
            continue
        if tokenizer_id not in (teacher_id if isinstance(teacher_id, (list, tuple)) else [teacher_id]):
            raise ValueError(
                f"The teacher {model_name(teacher)} came without a tokenizer, and its config's {name} is {teacher_id} "
                f"where the student's tokenizer has {tokenizer_id}: it does not use the student's vocabulary. Pass "
                "teacher_processing_class=<the teacher's tokenizer>, or use kd_trainers.DSKDTrainer for a teacher "
                "with another vocabulary."
            )


def check_same_head_size(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """For a teacher assumed to share the student's tokenizer: both heads must have the same number of rows."""
    student_rows, teacher_rows = output_head_shape(student)[0], output_head_shape(teacher)[0]
    if student_rows != teacher_rows:
        raise ValueError(
            f"The teacher {model_name(teacher)} came without a tokenizer and its output head has {teacher_rows} rows "
            f"where the student's has {student_rows}: a different vocabulary size, so the student's tokenizer cannot "
            "be assumed for it. For a teacher with another vocabulary use kd_trainers.DSKDTrainer (cross-model "
            "attention); if it does share the student's tokenizer (a padded head), pass "
            "teacher_processing_class=<the tokenizer>."
        )


def check_same_vocabulary(student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase,
                          student_name: str, teacher_name: str) -> None:
    """Fail unless both tokenizers map every token string to the same id.

    Sizes alone prove nothing: Llama-2 and Mistral both have 32,000 entries with different tokens, and logit KD between
    them would compare unrelated distributions without an error.
    """
    if student_tokenizer is teacher_tokenizer:
        return
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab == teacher_vocab:
        return
    student_by_id = {index: token for token, index in student_vocab.items()}
    teacher_by_id = {index: token for token, index in teacher_vocab.items()}
    differing = sorted(i for i in set(student_by_id) | set(teacher_by_id) if student_by_id.get(i) != teacher_by_id.get(i))
    examples = ", ".join(f"id {i}: {student_by_id.get(i)!r} vs {teacher_by_id.get(i)!r}" for i in differing[:3])
    raise ValueError(
        f"The student ({student_name}, {len(student_vocab)} tokens) and the teacher ({teacher_name}, "
        f"{len(teacher_vocab)} tokens) use different tokenizers: {len(differing)} token ids differ ({examples}). "
        "Logit distillation compares the two models token id by token id, so it needs one shared vocabulary. "
        "Use a teacher with the student's tokenizer, or kd_trainers' DSKDTrainer, which distils across vocabularies "
        "with cross-model attention."
    )


def output_head_shape(model: torch.nn.Module) -> torch.Size:
    """`[rows, hidden]` of the model's output head, also when ZeRO-3 has partitioned it (its tensor is then empty)."""
    weight = model.get_output_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)
