"""`DSKDConfig`: dual-space knowledge distillation settings, on top of `KDConfig`."""

from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass, field

from ..kd.config import DistillationConfig
from ..kd.two_tokenizers import TwoTokenizerFields
from ..losses.settings import LossSettings
from ..losses.divergences import DIVERGENCES
from ..teachers.needs import TeacherNeeds

T2S_TARGETS = ("gold", "teacher_argmax")
TOKEN_ALIGNMENTS = ("attention", "exact")
PROJECTOR_INITS = ("default", "pinv")


@dataclass
class DSKDConfig(TwoTokenizerFields, DistillationConfig):
    r"""
    Configuration class for [`DSKDTrainer`]: every field of `KDConfig` but those of a teacher cache, a served teacher
    and several teachers (DSKD reads one model's hidden states: `teacher_cache` or `teacher_url` is refused, with the
    reason), plus the DSKD settings below. Defaults follow
    the official DSKD scripts (`kd_temperature=2.0`, no T² scaling, `kd_weight=0.5`, `projector_lr=1e-3`).

    loss = (1 − w)·CE + w·(t2s_CE + t2s_KD + s2t_KD), each term summed over tokens and divided by the number of
    student label tokens (see `kd_trainers.losses.dual_space_loss`).

    > Parameters that control DSKD

    teacher_tokenizer_name_or_path (`str`, *optional*, defaults to `None`):
        The teacher's tokenizer, when no `teacher_processing_class` is given; defaults to the teacher's name or path.
    cross_model_attention (`bool`, *optional*, defaults to `None`):
        Align the two sequences with cross-model attention (DSKD-CMA). `None` decides from the tokenizers: on when
        they differ token by token, off when they are the same. `False` with different tokenizers is an error.
    token_alignment (`str`, *optional*, defaults to `"attention"`):
        How the two tokenizations' positions are paired when the vocabularies differ: `"attention"`, cross-model
        attention (DSKD-CMA); `"exact"`, DSKDv2's exact token alignment (one token each side over the same
        characters, projected as under one vocabulary; the other positions leave the t2s and s2t terms).
    projector_lr (`float`, *optional*, defaults to `1e-3`):
        Learning rate of the projectors (`query`, `t2s`, `s2t`), which train jointly with the student and follow the
        same schedule.
    projector_path (`str`, *optional*, defaults to `None`):
        A directory holding `dskd_projectors.safetensors` from an earlier run, to start the projectors from.
    projector_bias (`bool`, *optional*, defaults to `True`):
        Projectors with bias (DSKD) or without (DSKDv2).
    projector_init (`str`, *optional*, defaults to `"default"`):
        `"default"`: PyTorch's `nn.Linear` initialisation (DSKD). `"pinv"`: DSKDv2's pseudo-inverse initialisation
        of `t2s` and `s2t` from the two output heads over the tokens both vocabularies share.
    t2s_target (`str`, *optional*, defaults to `"gold"`):
        Label of the t2s cross-entropy and of the t2s KD gate: `"gold"` (DSKD) or `"teacher_argmax"` (DSKDv2; same
        vocabulary only, where the teacher's prediction at each position is defined).
    teacher_temperature (`float`, *optional*, defaults to `1.0`):
        Extra temperature τ_t of the t2s KD target (the projected teacher logits are divided by τ·τ_t), as in the
        official code, whose scripts leave it at 1.
    s2t_divergence (`str`, *optional*, defaults to `"forward_kl"`):
        Divergence of the teacher-space term. The official DSKD always uses forward KL there; DSKDv2 uses `divergence`.
    max_prompt_length (`int`, *optional*, defaults to `None`):
        Prompt tokens kept (from the right) on each side under cross-model attention; `None` keeps the whole prompt.
    lmbda, max_completion_length, temperature, top_p:
        The on-policy option across tokenizers (off by default), documented on `TwoTokenizerFields`.
    """

    kd_temperature: float = field(
        default=2.0, metadata={"help": "Temperature dividing both models' logits in the KD terms; > 0."}
    )
    kd_temperature_squared: bool = field(
        default=False, metadata={"help": "Multiply the KD terms by the squared temperature (off in DSKD)."}
    )
    cross_model_attention: bool | None = field(
        default=None, metadata={"help": "Use cross-model attention; None decides from the two tokenizers."}
    )
    token_alignment: str = field(
        default="attention", metadata={"help": "Pairing of the two tokenizations' positions across vocabularies.",
                                       "choices": list(TOKEN_ALIGNMENTS)}
    )
    projector_lr: float = field(default=1e-3, metadata={"help": "Learning rate of the DSKD projectors; > 0."})
    projector_path: str | None = field(
        default=None, metadata={"help": "Directory with dskd_projectors.safetensors to start the projectors from."}
    )
    projector_bias: bool = field(default=True, metadata={"help": "Projectors with bias (DSKD) or without (DSKDv2)."})
    projector_init: str = field(
        default="default", metadata={"help": "Projector initialisation.", "choices": list(PROJECTOR_INITS)}
    )
    t2s_target: str = field(
        default="gold", metadata={"help": "Label of the t2s CE and KD gate.", "choices": list(T2S_TARGETS)}
    )
    teacher_temperature: float = field(
        default=1.0, metadata={"help": "Extra temperature of the t2s KD target (official `teacher_temperature`); > 0."}
    )
    s2t_divergence: str = field(
        default="forward_kl",
        metadata={"help": "Divergence of the teacher-space KD term.", "choices": sorted(DIVERGENCES)},
    )
    # Teacher kinds this method cannot use: accepted by name only to be refused with the reason (`teacher_needs`).
    teacher_cache: InitVar[str | None] = None
    teacher_url: InitVar[str | None] = None

    def __post_init__(self, teacher_cache=None, teacher_url=None):
        self.refuse_teacher_kinds(teacher_cache=teacher_cache, teacher_url=teacher_url)
        checks = [
            ("projector_lr", self.projector_lr, isinstance(self.projector_lr, (int, float)) and self.projector_lr > 0,
             "a number > 0"),
            ("teacher_temperature", self.teacher_temperature,
             isinstance(self.teacher_temperature, (int, float)) and 0 < self.teacher_temperature < float("inf"),
             "a finite number > 0"),
            ("projector_init", self.projector_init, self.projector_init in PROJECTOR_INITS,
             f"one of {list(PROJECTOR_INITS)}"),
            ("t2s_target", self.t2s_target, self.t2s_target in T2S_TARGETS, f"one of {list(T2S_TARGETS)}"),
            ("token_alignment", self.token_alignment, self.token_alignment in TOKEN_ALIGNMENTS,
             f"one of {list(TOKEN_ALIGNMENTS)}"),
            ("s2t_divergence", self.s2t_divergence, self.s2t_divergence in DIVERGENCES,
             f"one of {sorted(DIVERGENCES)}"),
        ]
        for name, value, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {value!r}.")
        self._check_two_tokenizer_fields()
        if self.token_alignment == "exact" and self.cross_model_attention:
            raise ValueError("token_alignment='exact' pairs positions without cross-model attention, but "
                             "cross_model_attention=True asks for it: set one of them (exact alignment: leave "
                             "cross_model_attention=None).")
        if self.fp16:
            raise ValueError(
                "DSKD does not train in fp16 (fp16=True): the cross-model attention mask (-1e5) and the "
                "vocabulary-sized projected logits overflow fp16, and the official code fails there too. Use "
                "bf16=True, or neither for fp32."
            )
        super().__post_init__()

    def teacher_needs(self) -> TeacherNeeds:
        """The teacher's hidden states: its projectors and cross-model attention map them into the student's space."""
        why = ("DSKD needs the teacher's hidden states (its projectors and cross-model attention map them into the "
               "student's space), which {holder}. Drop {field} and give teacher_model_name_or_path, or use method kd{with_}.")
        return TeacherNeeds({
            "cache": why.format(holder="a cache of the teacher's distribution does not hold", field="teacher_cache",
                                with_=" with a teacher of the student's vocabulary"),
            "url": why.format(holder="a server's top-k log-probabilities do not hold", field="teacher_url", with_=""),
            "mixture": why.format(holder="several teachers mixed per token do not give", field="teacher_models",
                                  with_=" with them")})

    def _loss_setting_values(self) -> dict:
        return {**super()._loss_setting_values(), "teacher_temperature": self.teacher_temperature}

    def loss_settings(self) -> LossSettings:
        """KD's settings plus τ_t; the teacher-space divergence is checked with them (it reads jsd_beta/skew_alpha)."""
        settings = super().loss_settings()
        dataclasses.replace(settings, divergence=self.s2t_divergence)  # validates what s2t_divergence reads
        return settings
