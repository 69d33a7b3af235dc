"""`MinEDConfig`: MinED's distillation across tokenizers, on top of the settings every method shares."""

from __future__ import annotations

from dataclasses import InitVar, dataclass

from ..kd.config import DistillationConfig
from ..kd.two_tokenizers import TwoTokenizerFields
from ..teachers.needs import TeacherNeeds

# The divergence fields and the values MinED computes with (forward KL, as the DSKD authors' MinED): anything else is
# refused rather than silently not read.
_DIVERGENCE_DEFAULTS = {"divergence": "forward_kl", "jsd_beta": 0.5, "skew_alpha": 0.1, "divergence_params": None}


@dataclass
class MinEDConfig(TwoTokenizerFields, DistillationConfig):
    r"""
    Configuration class for [`MinEDTrainer`]: the settings every distillation method shares (`kd_weight`,
    `kd_temperature`, `kd_temperature_squared`, `teacher_logit_noise_std`, the loss's chunking, the teacher model)
    plus the teacher's tokenizer. The divergence is forward KL; the other `divergence` fields are refused when set.

    loss = [(1 − w)·CE + w·s·KD] / N: CE on the student's own labels; KD, at each student token, the KL from the
    teacher's distribution at its edit-distance partner carried into the student's vocabulary through the
    edit-distance vocabulary map, or the tempered CE of its label where it has no partner the map agrees with; s = T²
    when `kd_temperature_squared`, N the student label tokens (see `kd_trainers.losses.mapped`).

    > Parameters that control MinED

    teacher_tokenizer_name_or_path (`str`, *optional*, defaults to `None`):
        The teacher's tokenizer, when no `teacher_processing_class` is given; defaults to the teacher's name or path.
    max_prompt_length (`int`, *optional*, defaults to `None`):
        Prompt tokens kept (from the right) on each side; `None` keeps the whole prompt.
    lmbda, max_completion_length, temperature, top_p:
        The on-policy option across tokenizers (off by default), documented on `TwoTokenizerFields`.
    """

    # Teacher kinds this method cannot use: accepted by name only to be refused with the reason (`teacher_needs`).
    teacher_cache: InitVar[str | None] = None
    teacher_url: InitVar[str | None] = None

    def __post_init__(self, teacher_cache=None, teacher_url=None):
        self.refuse_teacher_kinds(teacher_cache=teacher_cache, teacher_url=teacher_url)
        for name, default in _DIVERGENCE_DEFAULTS.items():
            if getattr(self, name) != default:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not read by MinED, which takes the forward KL from the "
                    "teacher's distribution carried into the student's vocabulary. Remove it, or use method kd or "
                    "dskd for another divergence.")
        self._check_two_tokenizer_fields()
        super().__post_init__()

    def teacher_needs(self) -> TeacherNeeds:
        """A teacher model in memory: the loss carries the teacher's whole distribution into the student's
        vocabulary through the edit-distance map, and a teacher cache or server gives its top k only."""
        why = ("MinED carries the teacher's whole distribution into the student's vocabulary through the "
               "edit-distance map, and {holder}. Drop {field} and give teacher_model_name_or_path (ULD and GOLD read "
               "a {kind} at the teacher's own tokenization).")
        return TeacherNeeds({
            "cache": why.format(holder="a teacher cache holds its top k only", field="teacher_cache",
                                kind="teacher cache"),
            "url": why.format(holder="a served teacher answers its top k only", field="teacher_url",
                              kind="served teacher"),
            "mixture": "MinED reads one teacher's distribution at the positions of the teacher's own tokenization, "
                       "and several teachers are mixed per student token. Drop teacher_models and give "
                       "teacher_model_name_or_path."})
