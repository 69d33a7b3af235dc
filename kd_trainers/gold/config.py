"""`GOLDConfig`: GOLD's hybrid loss across tokenizers, on top of `ULDConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..losses.aligned import AlignedSettings
from ..uld.config import ULDConfig


@dataclass
class GOLDConfig(ULDConfig):
    r"""
    Configuration class for [`GOLDTrainer`]: every field of `ULDConfig`, plus the hybrid's two settings. Per aligned
    group, the token strings both vocabularies contain are compared exactly and the rest by ULD:

        hybrid = w_m · JSD_β(q_S[shared], q_T[shared]) + (1 − w_m) · ULD(q_S[rest], q_T[rest])

    with TRL's generalized JSD (β = 0: KL(q_T ‖ q_S); β = 1: KL(q_S ‖ q_T)) on the shared columns as they are (not
    renormalised), as in `trl.experimental.gold`.

    > Parameters that control GOLD

    gold_beta (`float`, *optional*, defaults to `0.5`):
        β of the exact part's generalized JSD, in [0, 1] (TRL's `beta`).
    gold_matched_weight (`float`, *optional*, defaults to `None`):
        w_m, in [0, 1]; `None` uses the shared share of the teacher's vocabulary (K / V_T), TRL's default.
    """

    gold_beta: float = field(default=0.5, metadata={"help": "β of the exact part's generalized JSD, in [0, 1]."})
    gold_matched_weight: float | None = field(
        default=None, metadata={"help": "Weight of the exact part, in [0, 1]; None: the shared share of the "
                                "teacher's vocabulary."})

    _method_label = "GOLD"
    _divergence_note = " on the tokens it cannot match and by the generalized JSD of gold_beta on those it can"

    def aligned_settings(self) -> AlignedSettings:
        for name in ("gold_beta", "gold_matched_weight"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 <= value <= 1):
                raise ValueError(f"{name} must be a number in [0, 1]{' or None' if 'weight' in name else ''}, got "
                                 f"{value!r}.")
        return AlignedSettings(distance="hybrid", merge=self.uld_merge, matched_beta=self.gold_beta,
                               matched_weight=self.gold_matched_weight)
