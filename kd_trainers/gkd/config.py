"""`GKDConfig`: on-policy distillation settings (TRL's `GKDConfig`) with the package's loss settings (`KDConfig`)."""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field

from trl.experimental.gkd import GKDConfig as TRLGKDConfig

from ..kd.config import DistillationConfig
from ..teachers.needs import TeacherNeeds


@dataclass
class GKDConfig(DistillationConfig, TRLGKDConfig):
    r"""
    Configuration class for [`GKDTrainer`]: every field of TRL's `GKDConfig` (`lmbda`, `beta`, `seq_kd`,
    `max_new_tokens`, the sampling `temperature`, ...) and of `KDConfig` (`divergence`, `kd_temperature`, `kd_weight`,
    `teacher_logit_noise_std`, ...).

    The defaults reproduce TRL's GKD loss: `divergence="jsd"` with β = `beta`, `kd_temperature=1`, `kd_weight=1` (no
    CE term), no noise. Two temperatures, on purpose: TRL's `temperature` is the *sampling* temperature of the
    on-policy completions, and TRL's loss always runs at T = 1; `kd_temperature` divides both models' logits in the
    loss (times T² when `kd_temperature_squared`).

    > Parameters that differ from `KDConfig`

    divergence (`str`, *optional*, defaults to `"jsd"`):
        As in `KDConfig`. With `"jsd"`, `beta` = 0 means forward KL and `beta` = 1 reverse KL, as in TRL.
    jsd_beta (`float`, *optional*, defaults to `None`):
        Follows `beta` (TRL's name for the same β); setting it to another value is an error.
    kd_weight (`float`, *optional*, defaults to `1.0`):
        w in `loss = (1 − w)·CE + w·KD`; the CE term is on the batch's labels (the dataset's completion off-policy,
        the sampled completion on-policy).
    """

    divergence: str = field(default="jsd", metadata={"help": "Divergence between the two distributions."})
    jsd_beta: float | None = field(default=None, metadata={"help": "Follows `beta`; leave unset."})
    kd_weight: float = field(default=1.0, metadata={"help": "Weight w in loss = (1 - w) * CE + w * KD, in [0, 1]."})
    # Teacher kinds this method cannot use: accepted by name only to be refused with the reason (`teacher_needs`).
    teacher_cache: InitVar[str | None] = None
    teacher_url: InitVar[str | None] = None

    def __post_init__(self, teacher_cache=None, teacher_url=None):
        self.refuse_teacher_kinds(teacher_cache=teacher_cache, teacher_url=teacher_url)
        # No field is rewritten here (β = 0 or 1 is mapped in `loss_settings`), so `dataclasses.replace` and a
        # round trip through `to_dict` give back the config that was written.
        if self.jsd_beta is not None and self.jsd_beta != self.beta:
            raise ValueError(f"jsd_beta ({self.jsd_beta}) and beta ({self.beta}) are the same setting in GKDConfig: "
                             "set beta only.")
        super().__post_init__()

    def teacher_needs(self) -> TeacherNeeds:
        """A teacher in memory, which scores the student's own samples inside each step."""
        return TeacherNeeds({
            "cache": "GKD scores the student's own samples, drawn while training, which no cache written beforehand "
                     "holds, and its off-policy batches are tokenized per batch, not by the trainer's dataset "
                     "preparation the cache is keyed to. Drop teacher_cache, or use method kd (off-policy "
                     "distillation on the dataset's completions) with it.",
            "url": "on-policy GKD with a served teacher is not supported yet (the student's samples would be scored "
                   "by the server inside each step). Drop teacher_url, or use method kd (off-policy distillation on "
                   "the dataset's completions) with it."})

    _loss_setting_names = {**DistillationConfig._loss_setting_names, "jsd_beta": "beta"}

    def _loss_setting_values(self) -> dict:
        """KD's settings with β = `beta`. TRL's generalised JSD at its ends: β = 0 is KL(p_T ‖ p_S), β = 1 is
        KL(p_S ‖ p_T), so `divergence="jsd"` there runs as forward or reverse KL (the JSD itself vanishes)."""
        values = {**super()._loss_setting_values(), "jsd_beta": self.beta}
        if self.divergence == "jsd" and self.beta in (0.0, 1.0):
            values["divergence"] = "forward_kl" if self.beta == 0.0 else "reverse_kl"
        return values
