"""`ULDConfig`: universal logit distillation across tokenizers, on top of the settings every method shares."""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field

from ..kd.config import DistillationConfig
from ..kd.two_tokenizers import TwoTokenizerFields
from ..losses.aligned import MERGES, AlignedSettings
from ..teachers.needs import TeacherNeeds


@dataclass
class ULDConfig(TwoTokenizerFields, DistillationConfig):
    r"""
    Configuration class for [`ULDTrainer`]: the settings every distillation method shares (`kd_weight`,
    `kd_temperature`, `teacher_logit_noise_std`, the loss's chunking, the teacher model) plus those below. The
    `divergence` fields are not read (ULD compares sorted probability vectors) and are refused when set.

    loss = [(1 − w)·CE + w·s·Σ_g ULD(q_S(g), q_T(g))] / N: CE on the student's own labels, ULD per aligned group g
    of the two tokenizations, `q(g)` a side's merged distribution at temperature T over the group's tokens, s = T²
    when `kd_temperature_squared`, N the student label tokens (see `kd_trainers.losses.aligned`).

    > Parameters that control ULD

    teacher_tokenizer_name_or_path (`str`, *optional*, defaults to `None`):
        The teacher's tokenizer, when no `teacher_processing_class` is given; defaults to the teacher's name or path.
    uld_merge (`str`, *optional*, defaults to `"observed"`):
        How a group of several tokens on one side becomes one distribution (GOLD's `uld_token_merge_strategy`):
        `"observed"`, the first token's distribution times the probabilities of the group's later tokens;
        `"bayesian"`, the last token's distribution times those of the earlier ones.
    max_prompt_length (`int`, *optional*, defaults to `None`):
        Prompt tokens kept (from the right) on each side; `None` keeps the whole prompt.
    lmbda, max_completion_length, temperature, top_p:
        The on-policy option across tokenizers (off by default), documented on `TwoTokenizerFields`.
    kd_temperature_squared (`bool`, *optional*, defaults to `False`):
        Multiply the ULD term by T² (off, as in ULD and GOLD).
    """

    kd_temperature_squared: bool = field(
        default=False, metadata={"help": "Multiply the ULD term by the squared temperature (off in ULD and GOLD)."}
    )
    uld_merge: str = field(
        default="observed", metadata={"help": "Merge of a multi-token aligned group.", "choices": list(MERGES)}
    )
    # Teacher kinds this method cannot use: accepted by name only to be refused with the reason (`teacher_needs`).
    teacher_cache: InitVar[str | None] = None
    teacher_url: InitVar[str | None] = None

    _method_label = "ULD"

    def __post_init__(self, teacher_cache=None, teacher_url=None):
        self.refuse_teacher_kinds(teacher_cache=teacher_cache, teacher_url=teacher_url)
        if self.uld_merge not in MERGES:
            raise ValueError(f"uld_merge must be one of {list(MERGES)}, got {self.uld_merge!r}.")
        self._refuse_divergence_fields()
        self._check_two_tokenizer_fields()
        self.aligned_settings()  # the loss's own checks, before the parent's set-up
        super().__post_init__()

    def _refuse_divergence_fields(self) -> None:
        """ULD reads no divergence: a divergence setting given to it would do nothing, so it is refused."""
        defaults = {"divergence": "forward_kl", "jsd_beta": 0.5, "skew_alpha": 0.1, "divergence_params": None}
        for name, default in defaults.items():
            if getattr(self, name) != default:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not read by {self._method_label}, which compares the two "
                    f"models' sorted probability vectors{self._divergence_note}. Remove {name}, or use method kd or "
                    "dskd for a divergence.")

    _divergence_note = ""

    def aligned_settings(self) -> AlignedSettings:
        """What `kd_trainers.losses.aligned` computes for this method."""
        return AlignedSettings(distance="uld", merge=self.uld_merge)

    def teacher_needs(self) -> TeacherNeeds:
        """A teacher model in memory: the loss reads the teacher's whole distribution at its own tokenization's
        positions, and a teacher cache or server here holds top-k targets at the student's positions."""
        why = (f"{self._method_label} reads the teacher's distribution at every position of the teacher's own "
               "tokenization, and {holder}. Drop {field} and give teacher_model_name_or_path{instead}.")
        return TeacherNeeds({
            "cache": why.format(holder="a teacher cache holds top-k targets at the student's token positions",
                                field="teacher_cache", instead=", or use method kd with a cache of the student's "
                                "vocabulary"),
            "url": why.format(holder="a served teacher answers at the student's token positions", field="teacher_url",
                              instead=""),
            "mixture": why.format(holder="several teachers are mixed per student token", field="teacher_models",
                                  instead="")})
